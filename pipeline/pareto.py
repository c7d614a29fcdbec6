"""Multi-objective studies: the Pareto front as artifacts.

After a multi-objective search the parent run gets `pareto_front.html` (interactive,
optuna.visualization), `pareto_front.png` (optuna.visualization.matplotlib; no kaleido or
Chrome needed) and `pareto_front.csv` (one row per Pareto trial). Which Pareto trial the
refit takes is `pipeline.best.best_trial`'s to say.
"""

from __future__ import annotations

import csv
import json
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from pipeline import names  # noqa: E402
from pipeline.best import front  # noqa: E402
from pipeline.config import Settings  # noqa: E402


def write_front(study: optuna.Study, objectives: list[str], folder: Path) -> list[Path]:
    """pareto_front.{html,png,csv} in `folder`."""
    html, png, table = folder / "pareto_front.html", folder / "pareto_front.png", folder / "pareto_front.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.visualization.plot_pareto_front(study, target_names=objectives).write_html(html, include_plotlyjs=True)
        ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=objectives)
    ax.figure.set_size_inches(7, 5)
    ax.figure.tight_layout()
    ax.figure.savefig(png, dpi=100)
    plt.close(ax.figure)
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *objectives, "epochs_needed", "warm_start", "configuration"])
        for t in front(study):
            writer.writerow([t.number, *t.values, t.user_attrs.get(names.EPOCHS_NEEDED, ""),
                             t.user_attrs.get(names.WARM_START, ""), json.dumps(t.user_attrs.get(names.PARAMS, t.params))])
    return [html, png, table]


def log_front(study: optuna.Study, settings: Settings, tracker) -> None:
    """Log the Pareto front of a multi-objective study to its parent run (a no-op before any
    trial completes)."""
    if not front(study):
        print("no complete trial yet: no Pareto front to log")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_front(study, settings.objective_names, Path(tmp)):
            tracker.client.log_artifact(tracker.parent_run_id, str(path))
    print(f"Pareto front: {len(front(study))} trial(s) -> pareto_front.html, pareto_front.png, pareto_front.csv")

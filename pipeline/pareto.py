"""Multi-objective studies: the Pareto front as artifacts, and the `select` rule that picks
the trial to refit from it.

After a multi-objective search the parent run gets `pareto_front.html` (interactive,
optuna.visualization), `pareto_front.png` (optuna.visualization.matplotlib; no kaleido or
Chrome needed) and `pareto_front.csv` (one row per Pareto trial). `select_trial` applies
`select=max_params=50000` (and/or `max_latency_ms=...`): among the Pareto trials within every
limit, the best by the metric; no rule means the best by the metric.
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

from pipeline.errors import PipelineError  # noqa: E402


def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto-optimal complete trials, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)


def select_trial(study: optuna.Study, settings) -> optuna.trial.FrozenTrial:
    """The Pareto trial that `settings.select` picks (see the module docstring)."""
    trials = front(study)
    if not trials:
        raise PipelineError(f"study {study.study_name!r} has no complete trial to refit")
    names = settings.objective_names
    for name, limit in settings.select_rules.items():
        i = names.index(name)
        within = [t for t in trials if t.values[i] <= limit]
        if not within:
            smallest = min(trials, key=lambda t: t.values[i])
            raise PipelineError(f"select={settings.select!r}: no Pareto trial has {name} <= {limit:g} "
                                f"(the smallest is {smallest.values[i]:g}, trial {smallest.number})")
        trials = within
    sign = 1 if settings.direction == "maximize" else -1
    return max(trials, key=lambda t: (sign * t.values[0], -t.number))


def write_front(study: optuna.Study, names: list[str], folder: Path) -> list[Path]:
    """pareto_front.{html,png,csv} in `folder`."""
    html, png, table = folder / "pareto_front.html", folder / "pareto_front.png", folder / "pareto_front.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.visualization.plot_pareto_front(study, target_names=names).write_html(html, include_plotlyjs=True)
        ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=names)
    ax.figure.set_size_inches(7, 5)
    ax.figure.tight_layout()
    ax.figure.savefig(png, dpi=100)
    plt.close(ax.figure)
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *names, "epochs_needed", "warm_start", "configuration"])
        for t in front(study):
            writer.writerow([t.number, *t.values, t.user_attrs.get("epochs_needed", ""),
                             t.user_attrs.get("warm_start", ""), json.dumps(t.user_attrs.get("params", t.params))])
    return [html, png, table]


def log_front(study: optuna.Study, settings, tracker) -> None:
    """Log the Pareto front of a multi-objective study to its parent run (a no-op before any
    trial completes)."""
    if not front(study):
        print("no complete trial yet: no Pareto front to log")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_front(study, settings.objective_names, Path(tmp)):
            tracker.client.log_artifact(tracker.parent_run_id, str(path))
    print(f"Pareto front: {len(front(study))} trial(s) -> pareto_front.html, pareto_front.png, pareto_front.csv")

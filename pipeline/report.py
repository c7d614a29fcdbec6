"""Reports a person can read, written as files and logged to the study's parent run.

    log_study_report(study, client, run_id)          # after a search: plots + trials table
    log_test_report(y_true, y_pred, class_names, report, report_text, client, run_id)  # after the refit

Study plots come from Optuna's visualization module: the plotly figure as interactive HTML
(`<name>.html`) and its matplotlib twin as PNG (`<name>.png`) for `optimization_history`,
`param_importances`, `parallel_coordinate` and `intermediate_values`. A plot the study
cannot support yet (no complete trial, importances from fewer than two complete trials or
without a varying parameter, no intermediate values) is skipped with a note, not an error.
`trials.csv` lists every trial: number, state, value, params, duration, and in a study with
rungs each evaluation's `rung`, `fidelity_epochs`, `fidelity_rows` and `promoted_from`; such a
study also gets `rungs.png` (scores by rung, promotions joined). `timeline_png` draws a finished
time-budgeted run's phases and evaluations against its seconds, from its records (docs/pictures.py).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import optuna.visualization as plotly_vis  # noqa: E402
import optuna.visualization.matplotlib as mpl_vis  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from pipeline import names  # noqa: E402

log = logging.getLogger(__name__)
COMPLETE = optuna.trial.TrialState.COMPLETE
STUDY_PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
# Embedding plotly.js makes each HTML file ~5 MB but lets it open offline, in the MLflow UI too.
INCLUDE_PLOTLYJS = True


def _varying_params(trials) -> set[str]:
    """Params present in every given trial that take more than one value among them."""
    common = set.intersection(*(set(t.params) for t in trials)) if trials else set()
    return {p for p in common if len({repr(t.params[p]) for t in trials}) > 1}


def why_not(name: str, study: optuna.Study) -> str | None:
    """Why the study cannot support plot `name` yet (None: it can)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == COMPLETE]
    if name == "intermediate_values":
        return None if any(t.intermediate_values for t in trials) else "no trial reported intermediate values"
    if not complete:
        return "no complete trial"
    if name == "param_importances":
        if len(complete) < 2:
            return f"needs at least 2 complete trials, the study has {len(complete)}"
        if not _varying_params(complete):
            return "no parameter varies across the complete trials"
    if name == "parallel_coordinate" and not any(t.params for t in complete):
        return "the complete trials have no parameters"
    return None


def study_plots(study: optuna.Study, folder: Path) -> dict[str, str]:
    """Write `<name>.html` and `<name>.png` for each supported plot; returns {name: why skipped}."""
    skipped = {}
    for name in STUDY_PLOTS:
        reason = why_not(name, study)
        if reason is None:
            try:
                _write_plot(name, study, folder)
            except (ValueError, RuntimeError) as e:  # Optuna's own refusals, e.g. a degenerate importance fit
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            skipped[name] = reason
            log.warning("report: %s plot skipped (%s)", name, reason)
    return skipped


def _target(name: str, study: optuna.Study) -> dict:
    """A multi-objective study's plots show its first objective, the search metric."""
    if len(study.directions) == 1 or name == "intermediate_values":
        return {}
    return {"target": lambda t: t.values[0], "target_name": study.user_attrs.get("metric", "objective 0")}


def _write_plot(name: str, study: optuna.Study, folder: Path) -> None:
    # Optuna's matplotlib plots switch the global style to ggplot (some of them only rely on
    # it): give all of them that style and keep it from leaking into later figures.
    target = _target(name, study)
    with warnings.catch_warnings(), plt.style.context("ggplot"):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # The plots of a small study are sketches by nature; these caveats would print on
        # every report: PED-ANOVA's importances from few trials per value, and matplotlib's
        # flat axis when every trial scored the same.
        warnings.filterwarnings("ignore", "Some regimes for parameter", UserWarning)
        warnings.filterwarnings("ignore", "Attempting to set identical low and high ylims", UserWarning)
        getattr(plotly_vis, f"plot_{name}")(study, **target).write_html(folder / f"{name}.html",
                                                                      include_plotlyjs=INCLUDE_PLOTLYJS)
        fig = np.atleast_1d(getattr(mpl_vis, f"plot_{name}")(study, **target)).flat[0].figure
        fig.set_size_inches(max(fig.get_figwidth(), 9), max(fig.get_figheight(), 6))
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)


def trials_table(study: optuna.Study, path: Path) -> Path:
    """One row per trial: number, state, value, params_*, duration (seconds), MLflow run id."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration", "user_attrs"))
    if frame.empty:
        frame = pd.DataFrame(columns=["number", "state", "value", "duration"])
    table = frame[[c for c in frame.columns if not c.startswith("user_attrs_")]].copy()
    table["duration"] = pd.to_timedelta(table["duration"]).dt.total_seconds()  # running trials: empty
    for attr in (names.EPOCHS_RUN, names.MLFLOW_RUN_ID, names.RUNG, names.FIDELITY_EPOCHS, names.FIDELITY_ROWS,
                 names.PROMOTED_FROM):
        if f"user_attrs_{attr}" in frame:
            table[attr] = frame[f"user_attrs_{attr}"]
    table.to_csv(path, index=False)
    return path


def rungs_png(study: optuna.Study, path: Path) -> Path | None:
    """Successive halving at a glance: each complete evaluation's score by rung (its epochs), a
    line from each promoted configuration's score to its score one rung up. None without rungs."""
    done = {t.number: t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if names.RUNG in t.user_attrs}
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    for t in done.values():
        source = done.get(t.user_attrs.get(names.PROMOTED_FROM))
        if source is not None:
            ax.plot([source.user_attrs[names.FIDELITY_EPOCHS], t.user_attrs[names.FIDELITY_EPOCHS]],
                    [source.values[0], t.values[0]], color="tab:blue", alpha=0.5, linewidth=1)
    ax.scatter([t.user_attrs[names.FIDELITY_EPOCHS] for t in done.values()], [t.values[0] for t in done.values()],
               c=[t.user_attrs[names.RUNG] for t in done.values()], cmap="viridis", zorder=3)
    ax.set_xscale("log")
    epochs = sorted({t.user_attrs[names.FIDELITY_EPOCHS] for t in done.values()})
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.minorticks_off()
    ax.set_xlabel("epochs of the evaluation (rung)")
    ax.set_ylabel(study.user_attrs.get("metric", "objective"))
    ax.set_title(f"Successive halving: {len(done)} evaluations, lines join a configuration's rungs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


STATE_COLOURS = {"COMPLETE": "tab:green", "PRUNED": "tab:orange", "FAIL": "tab:red"}


def timeline_png(study: optuna.Study, client, run_id: str, path: Path) -> Path | None:
    """Where a time-budgeted run's wall time went, from the records it left: its phases as bars
    against the seconds since the budget started, and each evaluation of the search as a bar from
    its start to its end on its rung's row, coloured by state. None for a run without a plan.

    The parent run `run_id` gives the phases: the budget's start (`plan_budget_end` less
    `plan_budget_seconds`, else the run's start), its own start (after loading), the plan's metrics
    (logged once probed and planned), the refit (`refit_seconds` up to its last `train_loss`
    epoch), the test (up to `refit_seconds`' logging) and the logging (up to the run's end); the
    study gives the evaluations (Optuna's start and completion times, their `rung`). What the
    search leaves before the refit starts (the study report, the refit's probe) has its own bar."""
    run = client.get_run(run_id)
    metrics = run.data.metrics
    if "plan_budget_seconds" not in metrics:
        return None

    def logged(key: str) -> float | None:  # epoch seconds at which `key` was last logged
        history = client.get_metric_history(run_id, key)
        return max(m.timestamp for m in history) / 1000 if history else None

    budget, begun = metrics["plan_budget_seconds"], run.info.start_time / 1000
    zero = metrics.get("plan_budget_end", begun + budget) - budget
    ended = run.info.end_time / 1000 if run.info.end_time else time.time()
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    planned = logged("plan_budget_seconds") or begun
    searched = max((t.datetime_complete.timestamp() for t in trials), default=planned)
    fitted, tested = logged("train_loss"), logged("refit_seconds")
    phases = [("start-up, load", zero, begun), ("probe, plan", begun, planned), ("search", planned, searched)]
    rows = sorted({t.user_attrs.get(names.RUNG, -1) for t in trials})
    if fitted and tested and "refit_seconds" in metrics:
        refit = fitted - metrics["refit_seconds"]
        phases += [("report, refit plan", searched, refit), ("refit", refit, fitted), ("test", fitted, tested),
                   ("logging", tested, ended)]
    labels = [p[0] for p in phases[:3]] + [f"rung {r}" if r >= 0 else "trials" for r in rows] + [p[0] for p in phases[3:]]
    at = {label: i for i, label in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 2))
    for label, start, end in phases:
        end = max(start, end)
        ax.barh(at[label], end - start, left=start - zero, color="tab:blue", height=0.6)
        ax.annotate(f"{end - start:.0f} s", (end - zero, at[label]), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    for t in trials:
        row = at[f"rung {t.user_attrs[names.RUNG]}" if names.RUNG in t.user_attrs else "trials"]
        start = t.datetime_start.timestamp() - zero
        ax.barh(row, t.datetime_complete.timestamp() - zero - start, left=start, height=0.6, edgecolor="white",
                linewidth=0.5, color=STATE_COLOURS.get(t.state.name, "tab:gray"))
    if metrics.get("plan_search_until"):
        ax.axvline(metrics["plan_search_until"] - zero, color="tab:gray", linestyle="--", label="the plan's search until")
    ax.axvline(budget, color="tab:red", label=f"budget end ({budget:.0f} s)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=STATE_COLOURS.get(state, "tab:gray"), label=f"evaluation {state.lower()}")
                for state in sorted({t.state.name for t in trials})]
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, max(budget, ended - zero) * 1.04)
    ax.set_xlabel("seconds since the budget started (the process's start)")
    ax.set_title(f"Time line of a {budget:.0f} s budget: {len(trials)} evaluations, {ended - zero:.0f} s in all")
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_study_report(study: optuna.Study, client, run_id: str) -> dict[str, str]:
    """Plots and trials table of `study` onto MLflow run `run_id`; returns the skipped plots."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        skipped = study_plots(study, folder)
        rungs_png(study, folder / "rungs.png")
        trials_table(study, folder / "trials.csv")
        client.log_artifacts(run_id, str(folder))
    return skipped


def confusion_pngs(y_true, y_pred, class_names: list[str], folder: Path) -> list[Path]:
    """Confusion matrix as counts and row-normalised, labelled with class names."""
    paths = []
    for normalize, name in ((None, "confusion_matrix.png"), ("true", "confusion_matrix_normalized.png")):
        size = max(5, 0.6 * len(class_names) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, labels=range(len(class_names)), display_labels=class_names, normalize=normalize,
            values_format=".2f" if normalize else "d", ax=ax, colorbar=False, xticks_rotation=45,
        )
        ax.set_title("Test confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
        ax.grid(False)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        paths.append(folder / name)
    return paths


def log_test_report(y_true, y_pred, class_names: list[str], report: dict, report_text: str,
                    params: dict, client, run_id: str) -> None:
    """Classification report (text, JSON), best params and confusion matrices onto `run_id`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "classification_report.txt").write_text(report_text)
        (folder / "classification_report.json").write_text(json.dumps(report, indent=2))
        (folder / "best_params.json").write_text(json.dumps(params, indent=2))
        confusion_pngs(y_true, y_pred, class_names, folder)
        client.log_artifacts(run_id, str(folder))

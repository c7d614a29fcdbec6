"""What a person reads: a progress bar during the search, a summary at the end of a
command, and the same facts as the Markdown description of the study's parent run.

    with progress_bar(study, settings, until) as callback:   # tqdm: trials done / budget, best
        study.optimize(..., callbacks=[callback])
    print(summary(study, settings, parent_run_id, metrics))
    tracker.describe(description(study, settings, parent_run))

The bar counts complete and pruned trials of the whole study (all workers share the
budget) and replaces Optuna's per-trial INFO lines, which are silenced while it runs; the
log lines that still come (Optuna's warnings, the tracking server's retries) are written above
the bar, each on its own line, not after its last refresh. With
a study-wide deadline it shows the time left to the deadline instead of an estimate for
the whole trial budget, refreshed while trials run. The summary lists trials by state, the
best trial's value and params, the test scores, the parent MLflow run, the registered model
and the commands to browse them; the description adds the exact commands that resume the
study and serve the model. Any password in a URL is masked.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shlex
import sys
import threading
import time

import mlflow
import optuna
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import names
from pipeline.best import best_or_none, verdict_of
from pipeline.config import Settings
from pipeline.names import mask
from pipeline.study import counted_trials

REFRESH_TTY, REFRESH_LOG = 1, 60  # seconds between refreshes of a deadline bar: terminal, log file
WEAKEST = 3  # classes of lowest test F1 the summary names
LOGGERS = ("optuna", "urllib3.connectionpool")  # with a stderr handler of their own (MLflow's writes to a wrapper)


class ProgressBar:
    """Optuna callback that moves a tqdm bar to the study's counted trials and shows the best;
    with a deadline (`until`, epoch seconds) the time left to it instead of an ETA."""

    def __init__(self, study: optuna.Study, settings: Settings, until: float | None = None):
        self.study, self.settings, self.until = study, settings, until
        self.metric, self.budget = settings.metric, settings.n_trials
        self._best = ""
        bar_format = None if until is None else "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
        self.bar = tqdm(total=self.budget, initial=min(counted_trials(study), self.budget),
                        desc=f"study {study.study_name}", unit="trial", dynamic_ncols=True, bar_format=bar_format)
        self(study, None)

    def _postfix(self) -> str:
        parts = [self._best] if self._best else []
        if self.until is not None:
            parts.insert(0, f"{tqdm.format_interval(max(0.0, self.until - time.time()))} to the deadline")
        return ", ".join(parts)

    def refresh(self) -> None:
        self.bar.set_postfix_str(self._postfix(), refresh=True)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        best = best_or_none(study, self.settings)
        self._best = "" if best is None else f"best {self.metric}={best.values[0]:.4f} (trial {best.number}{at(best)})"
        self.bar.n = min(counted_trials(study), self.budget)
        self.refresh()


@contextlib.contextmanager
def progress_bar(study: optuna.Study, settings: Settings, until: float | None = None):
    """A `ProgressBar` callback; Optuna's INFO logging is quiet while it runs, other log lines
    go above the bar. A deadline bar is refreshed from a background thread, so its clock moves
    during long trials."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with logging_redirect_tqdm(_console_loggers(), tqdm_class=tqdm):
        bar = ProgressBar(study, settings, until)
        stop = threading.Event()
        ticker = None
        if until is not None:
            every = REFRESH_TTY if sys.stderr.isatty() else REFRESH_LOG

            def tick():
                while not stop.wait(every):
                    bar.refresh()

            ticker = threading.Thread(target=tick, name="progress-clock", daemon=True)
            ticker.start()
        try:
            yield bar
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            bar.bar.close()
            optuna.logging.set_verbosity(verbosity)


def _console_loggers() -> list[logging.Logger]:
    """Those of LOGGERS that write to stderr through a handler of their own (tqdm's redirect
    would add one to a logger without)."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    return [logger for logger in loggers
            if any(type(h) is logging.StreamHandler and h.stream is sys.stderr for h in logger.handlers)]


def at(trial: optuna.trial.FrozenTrial) -> str:
    """`, rung 1 (90 s)`: where an evaluation of a study with rungs was made ('' without), so that
    a best that falls when the study reaches a higher rung does not read as a regression."""
    if names.RUNG not in trial.user_attrs:
        return ""
    seconds = trial.user_attrs.get(names.FIDELITY_SECONDS)
    fidelity = f"{seconds:.0f} s" if seconds else f"{trial.user_attrs.get(names.FIDELITY_EPOCHS, '?')} epochs"
    return f", rung {trial.user_attrs[names.RUNG]} ({fidelity})"


def dashboard_command(storage: str) -> str:
    """The optuna-dashboard command for a storage URL (a journal file is given by its path)."""
    target = storage.removeprefix("journal://") if storage.startswith("journal://") else mask(storage)
    return f"optuna-dashboard {target}"


def summary(study: optuna.Study, settings: Settings, parent_run_id: str, metrics: dict | None = None) -> str:
    """Lines for the end of a command: trials by state, best trial, test scores, where to look."""
    states = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
    lines = [f"study {study.study_name!r}: {sum(states.values())} trials ({by_state}), budget {settings.n_trials}",
             settings.space_line]
    best = best_or_none(study, settings)
    label = f"Pareto trial picked by select={settings.select or 'most accurate'}" if settings.multi_objective else "best trial"
    if best is None:
        lines.append(f"{label}: none complete yet")
    else:
        lines.append(f"{label}: #{best.number} {settings.metric}={best.values[0]:.4f}{at(best)}")
        verdict = verdict_of(study, settings)
        if verdict is not None:
            lines.append(verdict.line(settings.sign))
        params = best.user_attrs.get(names.PARAMS, best.params)
        lines.extend(f"  {k} = {v}" for k, v in params.items())
    for k, v in (metrics or {}).items():
        if not k.startswith(("test_precision_", "test_recall_", "test_f1_")) or k.endswith("_macro"):
            lines.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    if weakest := weakest_classes(metrics or {}):
        lines.append(f"weakest classes by test F1: {weakest}")
    run = mlflow.MlflowClient().get_run(parent_run_id)
    lines.append(f"MLflow parent run: {parent_run_id} (experiment id {run.info.experiment_id})")
    registered = run.data.tags.get("registered_model")
    if registered:
        lines.append(f"registered model: {registered}; serve it with:")
        lines.append(f"  {serve_command(registered)}")
    uri = mask(mlflow.get_tracking_uri())
    if uri.startswith(("http://", "https://")):  # a tracking server has the UI already
        lines.append("browse the runs:  " + runs_page(run.info.experiment_id, uri))
    else:
        lines.append("browse the runs:  mlflow ui --backend-store-uri " + uri)
        lines.append("  then open " + runs_page(run.info.experiment_id))
    lines.append("browse the study: " + dashboard_command(settings.storage))
    return "\n".join(lines)


def weakest_classes(metrics: dict, count: int = WEAKEST) -> str:
    """`cat 0.4120, dog 0.5533, bird 0.6001`: the `count` classes of lowest test F1 (the
    refit's per-class `test_f1_<class>` metrics, pipeline.refit.score); "" without them."""
    scores = {k.removeprefix("test_f1_"): v for k, v in metrics.items()
              if k.startswith("test_f1_") and k != "test_f1_macro"}
    return ", ".join(f"{name} {v:.4f}" for name, v in sorted(scores.items(), key=lambda kv: kv[1])[:count])


def runs_page(experiment_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the UI of `server` (`mlflow ui`'s by default). MLflow 3.17's UI
    opens every experiment on its GenAI overview unless the workflow switch says "Model
    training": the URL says so."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def serve_command(registered: str) -> str:
    return f"mlflow models serve -m models:/{registered} --env-manager local --port 5001"


def description(study: optuna.Study, settings: Settings, run) -> str:
    """The parent run's Markdown description: trials, best trial, refit and test scores,
    registered model, and the exact commands that resume the study and serve the model."""
    states = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none yet"
    rows = [("trials", f"{sum(states.values())} ({by_state}); budget {settings.n_trials}")]
    best = best_or_none(study, settings)
    if best is not None:
        rows.append(("best trial", f"#{best.number}: {settings.metric} {best.values[0]:.4f}"))
    metrics, tags = run.data.metrics, run.data.tags
    if "test_accuracy" in metrics:
        rows.append(("refit", f"trial #{tags.get('best_trial_number', '?')} for {int(metrics['refit_epochs'])} "
                              f"epoch(s) on the whole train split"))
        rows.append(("test scores", ", ".join(f"{k} {metrics[k]:.4f}" for k in
                                               ("test_accuracy", "test_f1_macro", "test_precision_macro",
                                                "test_recall_macro") if k in metrics)))
        if weakest := weakest_classes(metrics):
            rows.append(("weakest classes by test F1", weakest))
    if "registered_model" in tags:
        name, version = tags["registered_model"].split("/")
        rows.append(("registered model", f"{name}, version {version}"))
    lines = [f"### Study `{study.study_name}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if best is not None:
        params = best.user_attrs.get(names.PARAMS, best.params)
        lines += ["", "**Best configuration:** " + ", ".join(f"`{k}={v}`" for k, v in params.items())]
    uri = f"cd {shlex.quote(os.getcwd())} && MLFLOW_TRACKING_URI={mask(mlflow.get_tracking_uri())} "
    lines += ["", "**Resume the study** (more trials: raise `--n-trials`; `main` also refits):", "",
              "```", uri + settings.command_line("search"), "```"]
    if "registered_model" in tags:
        lines += ["", "**Serve the model:**", "", "```", uri + serve_command(tags["registered_model"]), "```"]
    return "\n".join(lines)

"""What the terminal shows: a progress bar during the search and a summary at the end.

    with progress_bar(study, settings) as callback:   # tqdm: trials done / budget, current best
        study.optimize(..., callbacks=[callback])
    print(summary(study, settings, parent_run_id, metrics))

The bar counts complete and pruned trials of the whole study (all workers share the
budget) and replaces Optuna's per-trial INFO lines, which are silenced while it runs.
The summary lists trials by state, the best trial's value and params, the test scores,
the parent MLflow run, the registered model and the commands to browse them, with any
password in a URL masked.
"""

from __future__ import annotations

import collections
import contextlib

import mlflow
import optuna
from tqdm import tqdm

from pipeline.errors import PipelineError, mask
from pipeline.pareto import select_trial
from pipeline.study import counted_trials


def _best(study: optuna.Study, settings) -> optuna.trial.FrozenTrial | None:
    """The best trial; in a multi-objective study the Pareto trial that `select` picks.
    None while there is none (or no Pareto trial meets the `select` rule)."""
    if settings.multi_objective:
        try:
            return select_trial(study, settings)
        except PipelineError:
            return None
    try:
        return study.best_trial
    except ValueError:
        return None


class ProgressBar:
    """Optuna callback that moves a tqdm bar to the study's counted trials and shows the best."""

    def __init__(self, study: optuna.Study, settings):
        self.settings, self.metric, self.budget = settings, settings.metric, settings.n_trials
        done, best = self._state(study)
        self.bar = tqdm(total=self.budget, initial=done, postfix=best, desc=f"study {study.study_name}",
                        unit="trial", dynamic_ncols=True)

    def _state(self, study: optuna.Study) -> tuple[int, str]:
        best = _best(study, self.settings)
        return (min(counted_trials(study), self.budget),
                "" if best is None else f"best {self.metric}={best.values[0]:.4f} (trial {best.number})")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.bar.n, best = self._state(study)
        self.bar.set_postfix_str(best, refresh=False)
        self.bar.refresh()


@contextlib.contextmanager
def progress_bar(study: optuna.Study, settings):
    """A `ProgressBar` callback; Optuna's INFO logging is quiet while it runs."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bar = ProgressBar(study, settings)
    try:
        yield bar
    finally:
        bar.bar.close()
        optuna.logging.set_verbosity(verbosity)


def dashboard_command(storage: str) -> str:
    """The optuna-dashboard command for a storage URL (a journal file is given by its path)."""
    target = storage.removeprefix("journal://") if storage.startswith("journal://") else mask(storage)
    return f"optuna-dashboard {target}"


def summary(study: optuna.Study, settings, parent_run_id: str, metrics: dict | None = None) -> str:
    """Lines for the end of a command: trials by state, best trial, test scores, where to look."""
    states = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
    lines = [f"study {study.study_name!r}: {sum(states.values())} trials ({by_state}), budget {settings.n_trials}"]
    best = _best(study, settings)
    label = f"Pareto trial picked by select={settings.select or 'most accurate'}" if settings.multi_objective else "best trial"
    if best is None:
        lines.append(f"{label}: none complete yet")
    else:
        lines.append(f"{label}: #{best.number} {settings.metric}={best.values[0]:.4f}")
        params = best.user_attrs.get("params", best.params)
        lines.extend(f"  {k} = {v}" for k, v in params.items())
    for k, v in (metrics or {}).items():
        if not k.startswith(("test_precision_", "test_recall_", "test_f1_")) or k.endswith("_macro"):
            lines.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    run = mlflow.MlflowClient().get_run(parent_run_id)
    lines.append(f"MLflow parent run: {parent_run_id} (experiment id {run.info.experiment_id})")
    registered = run.data.tags.get("registered_model")
    if registered:
        lines.append(f"registered model: {registered}; serve it with:")
        lines.append(f"  mlflow models serve -m models:/{registered} --env-manager local --port 5001")
    lines.append("browse the runs:  mlflow ui --backend-store-uri " + mask(mlflow.get_tracking_uri()))
    lines.append("browse the study: " + dashboard_command(settings.storage))
    return "\n".join(lines)

"""MLflow tracking: one parent run per study, one nested run per trial.

The parent run's id lives in the study's user attributes (`mlflow_parent_run_id`), so every
worker and every resume finds the same parent. Under `mlflow run`, MLFLOW_RUN_ID names the
project's run: it becomes the parent of a new study, or, when the study already has a parent,
a worker run nested under it. All calls go through an explicit `MlflowClient` and run ids,
so no fluent "active run" state can make a trial overwrite its parent.

When several workers start on a fresh study at once, only the one that created the study
makes the parent; the others wait for its id to appear. A trial's run ends with the trial:
FINISHED, FAILED, or KILLED on Ctrl-C/SIGTERM, with the tag `pipeline.fail_reason`; the
run of a trial whose worker died is closed by `close_dead_runs` (see `pipeline.recover`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor

import keras
import mlflow
import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pipeline.errors import mask
from pipeline.train import prefixed

PARENT_ATTR = "mlflow_parent_run_id"
PARENT_WAIT = 60  # seconds a worker that did not create the study waits for its parent run
FAIL_REASON = "pipeline.fail_reason"  # MLflow tag (and trial user attr `fail_reason`) of a failed trial


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def _client() -> MlflowClient:
    """An MlflowClient. On first use MLflow sets up a SQLite store's tables, and workers doing
    that at once corrupt it: they take turns, with a file lock beside the database."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return MlflowClient()
    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient()


def _wait_for_parent(study: optuna.Study, timeout: float = PARENT_WAIT) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stored := study.user_attrs.get(PARENT_ATTR):
            return stored
        time.sleep(0.2)
    return None


def end_run(client: MlflowClient, run_id: str, state: str, status: str, reason: str | None = None):
    """Close a trial's run: Optuna's state as a tag, MLflow's status, and why it failed."""
    client.set_tag(run_id, "optuna.trial_state", state)
    if reason:
        client.set_tag(run_id, FAIL_REASON, mask(reason)[:500])
    client.set_terminated(run_id, status=status)


def close_dead_runs(client: MlflowClient, study: optuna.Study, experiment_id: str) -> list[int]:
    """End the runs still RUNNING of trials already FAIL in Optuna (their worker died):
    FAILED, never left RUNNING. Returns those trial numbers."""
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))}
    if not failed:
        return []
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        number = tags.get("optuna.trial_number")
        if tags.get("optuna.study_name") == study.study_name and number is not None and int(number) in failed:
            end_run(client, run.info.run_id, "FAIL", "FAILED", "worker died (lost heartbeat or process gone)")
            closed.append(int(number))
    return sorted(closed)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict) -> None:
    """Several metrics (step 0) in one store round trip."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()])


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's `train_*` / `val_*` metrics and its wall seconds to one MLflow run,
    and the model's `params_count` when training starts (so pruned trials have it too).

    With an `executor` the store writes run in its thread, so training never waits for a
    store round trip; `wait()` returns once every epoch logged so far is written."""

    def __init__(self, client: MlflowClient, run_id: str, step_offset: int = 0, executor=None):
        super().__init__()
        self.client, self.run_id, self.offset, self.executor = client, run_id, step_offset, executor
        self.pending = []

    def on_train_begin(self, logs=None):
        self.client.log_metric(self.run_id, "params_count", self.model.count_params(), step=self.offset)

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        metrics = {**prefixed(logs or {}), "epoch_seconds": seconds}
        now = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, v, now, self.offset + epoch) for k, v in metrics.items()]
        if self.executor is None:
            self.client.log_batch(self.run_id, metrics=batch)
        else:
            self.pending.append(self.executor.submit(self.client.log_batch, self.run_id, metrics=batch))

    def wait(self):
        while self.pending:
            self.pending.pop(0).result()


def project_run_id() -> str | None:
    """The run `mlflow run` opened (MLFLOW_RUN_ID), taken out of the environment so that no
    fluent MLflow call later reuses it by accident."""
    return os.environ.pop("MLFLOW_RUN_ID", None)


def new_parent_run(client: MlflowClient, experiment_name: str, run_name: str, project_run: str | None) -> str:
    """`project_run` when `mlflow run` opened one, else a new run in `experiment_name`."""
    if project_run:
        return project_run
    experiment = mlflow.set_experiment(experiment_name)
    return client.create_run(experiment.experiment_id, run_name=run_name).info.run_id


class Tracker:
    """Finds or makes the study's parent run and makes the trial runs under it."""

    def __init__(self, study: optuna.Study, settings, *, wait_for_parent: bool = False, device: str = ""):
        """`wait_for_parent`: another worker has just created the study (see
        `pipeline.study.join_study`) and is about to store its parent run id: wait for it.
        `device`: which device trains, tagged on the parent, worker and trial runs."""
        self.client = _client()
        self.device = device
        self.study = study
        self.settings = settings
        project_run = project_run_id()
        stored = study.user_attrs.get(PARENT_ATTR) or (_wait_for_parent(study) if wait_for_parent else None)
        self.worker_run_id = None
        self._loggers: dict[str, list[EpochLogger]] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epoch-log")
        if stored and _run_exists(self.client, stored):
            self.parent_run_id = stored
            if project_run and project_run != stored:
                self.worker_run_id = project_run
                self.client.set_tag(project_run, "mlflow.parentRunId", stored)
                self.client.set_tag(project_run, "pipeline.role", "worker")
        else:
            self.parent_run_id = new_parent_run(self.client, settings.experiment_name, study.study_name, project_run)
            study.set_user_attr(PARENT_ATTR, self.parent_run_id)
        self.experiment_id = self.client.get_run(self.parent_run_id).info.experiment_id
        self._describe_parent()

    def _describe_parent(self):
        s = self.settings
        tags = {
            "optuna.study_name": self.study.study_name,
            "optuna.storage": mask(s.storage),
            "pipeline.role": "study",
            "dataset": s.dataset,
            "search_space": s.search_space,
            "objectives": ",".join(s.objective_names),
        }
        if s.multi_objective:
            tags["pruning"] = "off: Optuna does not prune multi-objective studies"
        for k, v in tags.items():
            self.client.set_tag(self.parent_run_id, k, v)
        if self.device:
            for run_id in filter(None, (self.parent_run_id, self.worker_run_id)):
                self.client.set_tag(run_id, "device", self.device)
        run = self.client.get_run(self.parent_run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(self.parent_run_id, status="RUNNING")
        # Params are write-once in MLflow: log the study-defining ones only on first sight.
        if "metric" not in run.data.params:
            for k, v in {"dataset": s.dataset, "search_space": s.search_space, "metric": s.metric,
                         "direction": s.direction, "epochs": s.epochs, "cv_folds": s.cv_folds,
                         "pruner": s.pruner if s.pruning else "none", "seed": s.seed, "storage": mask(s.storage),
                         "objectives": ",".join(s.objective_names)}.items():
                self.client.log_param(self.parent_run_id, k, v)

    @property
    def nest_under(self) -> str:
        return self.worker_run_id or self.parent_run_id

    @contextlib.contextmanager
    def trial_run(self, trial: optuna.Trial, params: dict):
        """A nested MLflow run for one trial; its end state mirrors the trial's."""
        tags = {
            "mlflow.parentRunId": self.nest_under,
            "optuna.study_name": self.study.study_name,
            "optuna.trial_number": str(trial.number),
            "optuna.trial_state": "RUNNING",
            **({"device": self.device} if self.device else {}),
        }
        if "warm_start" in trial.user_attrs:
            tags["warm_start"] = trial.user_attrs["warm_start"]
        run_id = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags).info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        try:
            yield run_id
        except optuna.TrialPruned:
            self.end_trial(run_id, "PRUNED", "FINISHED")
            raise
        except Exception as e:
            self.end_trial(run_id, "FAIL", "FAILED", f"{type(e).__name__}: {e}")
            raise
        except BaseException as e:  # Ctrl-C or SIGTERM (see pipeline.interrupts)
            reason = f"interrupted by {str(e) or 'SIGINT'}" if isinstance(e, KeyboardInterrupt) else type(e).__name__
            trial.set_user_attr("fail_reason", reason)
            self.end_trial(run_id, "FAIL", "KILLED", reason)
            raise
        else:
            self.end_trial(run_id, "COMPLETE", "FINISHED")

    def close_dead_runs(self) -> list[int]:
        return close_dead_runs(self.client, self.study, self.experiment_id)

    def end_trial(self, run_id: str, state: str, status: str, reason: str | None = None):
        for logger in self._loggers.pop(run_id, []):
            logger.wait()  # every epoch's metrics are in the store before the run ends
        end_run(self.client, run_id, state, status, reason)

    def epoch_logger(self, run_id: str, step_offset: int = 0) -> EpochLogger:
        logger = EpochLogger(self.client, run_id, step_offset, self._writer)
        self._loggers.setdefault(run_id, []).append(logger)
        return logger

    def finish(self, status: str = "FINISHED"):
        """End this process's worker run, and the parent unless other workers still run
        trials (the last one out ends it; it is reopened on resume)."""
        self._writer.shutdown(wait=True)
        if not RunStatus.is_terminated(RunStatus.from_string(status)):
            return
        if self.worker_run_id:
            self.client.set_terminated(self.worker_run_id, status=status)
        if not self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.client.set_terminated(self.parent_run_id, status=status)

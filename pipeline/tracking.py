"""MLflow tracking: one parent run per study, one nested run per trial.

The parent run's id lives in the study's user attributes (`mlflow_parent_run_id`), so every
worker and every resume finds the same parent. Under `mlflow run`, MLFLOW_RUN_ID names the
project's run: it becomes the parent of a new study, or, when the study already has a parent,
a worker run nested under it. All calls go through an explicit `MlflowClient` and run ids,
so no fluent "active run" state can make a trial overwrite its parent.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import keras
import mlflow
import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pipeline.train import prefixed

PARENT_ATTR = "mlflow_parent_run_id"
_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")


def mask(url: str) -> str:
    """Hide the password of a storage URL: postgresql://u:secret@h/db -> postgresql://u:***@h/db."""
    return _PASSWORD.sub(r"\1***\3", url)


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's `train_*` / `val_*` metrics and its wall seconds to one MLflow run.

    With an `executor` the store writes run in its thread, so training never waits for a
    store round trip; `wait()` returns once every epoch logged so far is written."""

    def __init__(self, client: MlflowClient, run_id: str, step_offset: int = 0, executor=None):
        super().__init__()
        self.client, self.run_id, self.offset, self.executor = client, run_id, step_offset, executor
        self.pending = []

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


class Tracker:
    """Finds or makes the study's parent run and makes the trial runs under it."""

    def __init__(self, study: optuna.Study, settings, device: str = ""):
        self.client = MlflowClient()
        self.device = device  # which device trains, tagged on the parent, worker and trial runs
        self.study = study
        self.settings = settings
        project_run = os.environ.pop("MLFLOW_RUN_ID", None)  # set by `mlflow run`
        stored = study.user_attrs.get(PARENT_ATTR)
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
            if project_run:
                self.parent_run_id = project_run
            else:
                experiment = mlflow.set_experiment(settings.experiment_name)
                self.parent_run_id = self.client.create_run(experiment.experiment_id, run_name=study.study_name).info.run_id
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
        }
        for k, v in tags.items():
            self.client.set_tag(self.parent_run_id, k, v)
        for run_id in filter(None, (self.parent_run_id, self.worker_run_id)):
            if self.device:
                self.client.set_tag(run_id, "device", self.device)
        run = self.client.get_run(self.parent_run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(self.parent_run_id, status="RUNNING")
        # Params are write-once in MLflow: log the study-defining ones only on first sight.
        if "metric" not in run.data.params:
            for k, v in {"dataset": s.dataset, "search_space": s.search_space, "metric": s.metric,
                         "direction": s.direction, "epochs": s.epochs, "cv_folds": s.cv_folds,
                         "pruner": s.pruner, "seed": s.seed, "storage": mask(s.storage)}.items():
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
        run_id = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags).info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        try:
            yield run_id
        except optuna.TrialPruned:
            self.end_trial(run_id, "PRUNED", "FINISHED")
            raise
        except Exception:
            self.end_trial(run_id, "FAIL", "FAILED")
            raise
        except BaseException:  # Ctrl-C, SIGTERM
            self.end_trial(run_id, "FAIL", "KILLED")
            raise
        else:
            self.end_trial(run_id, "COMPLETE", "FINISHED")

    def end_trial(self, run_id: str, state: str, status: str):
        for logger in self._loggers.pop(run_id, []):
            logger.wait()  # every epoch's metrics are in the store before the run ends
        self.client.set_tag(run_id, "optuna.trial_state", state)
        self.client.set_terminated(run_id, status=status)

    def epoch_logger(self, run_id: str, step_offset: int = 0) -> EpochLogger:
        logger = EpochLogger(self.client, run_id, step_offset, self._writer)
        self._loggers.setdefault(run_id, []).append(logger)
        return logger

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0):
        """Several metrics in one store round trip."""
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, status: str = "FINISHED"):
        """End this process's runs (the parent stays resumable: it is reopened on resume)."""
        self._writer.shutdown(wait=True)
        for run_id in filter(None, (self.worker_run_id, self.parent_run_id)):
            if RunStatus.is_terminated(RunStatus.from_string(status)):
                self.client.set_terminated(run_id, status=status)

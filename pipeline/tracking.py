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
    """Logs each epoch's `train_*` / `val_*` metrics and its wall seconds to one MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str, step_offset: int = 0):
        super().__init__()
        self.client, self.run_id, self.offset = client, run_id, step_offset

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        metrics = {**prefixed(logs or {}), "epoch_seconds": seconds}
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[mlflow.entities.Metric(k, v, now, self.offset + epoch) for k, v in metrics.items()]
        )


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

    def __init__(self, study: optuna.Study, settings):
        self.client = MlflowClient()
        self.study = study
        self.settings = settings
        project_run = project_run_id()
        stored = study.user_attrs.get(PARENT_ATTR)
        self.worker_run_id = None
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
        except Exception:
            self.end_trial(run_id, "FAIL", "FAILED")
            raise
        except BaseException:  # Ctrl-C, SIGTERM
            self.end_trial(run_id, "FAIL", "KILLED")
            raise
        else:
            self.end_trial(run_id, "COMPLETE", "FINISHED")

    def end_trial(self, run_id: str, state: str, status: str):
        self.client.set_tag(run_id, "optuna.trial_state", state)
        self.client.set_terminated(run_id, status=status)

    def epoch_logger(self, run_id: str, step_offset: int = 0) -> EpochLogger:
        return EpochLogger(self.client, run_id, step_offset)

    def finish(self, status: str = "FINISHED"):
        """End this process's runs (the parent stays resumable: it is reopened on resume)."""
        for run_id in filter(None, (self.worker_run_id, self.parent_run_id)):
            if RunStatus.is_terminated(RunStatus.from_string(status)):
                self.client.set_terminated(run_id, status=status)

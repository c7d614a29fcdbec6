"""MLflow tracking: one parent run per study, one nested run per trial.

The parent run's id lives in the study's user attributes (`mlflow_parent_run_id`), so every
worker and every resume finds the same parent. It is named after the study (also under
`mlflow run`, whose run it becomes), and its experiment is marked as a model-training one
(`mlflow.experimentKind`; MLflow 3.17's UI still follows its own GenAI / Model training
switch, which the URL `pipeline.terminal.runs_page` prints sets). Under `mlflow run`,
MLFLOW_RUN_ID names the project's run: it becomes the parent of a new study, or, when the
study already has a parent, a worker run nested under it. All calls go through an explicit
`MlflowClient` and run ids, so no fluent "active run" state can make a trial overwrite its parent.

When several workers start on a fresh study at once, only the one that created the study
makes the parent; the others wait for its id to appear. A trial's run ends with the trial:
FINISHED, FAILED, or KILLED on Ctrl-C/SIGTERM, with the tag `pipeline.fail_reason`; the
run of a trial whose worker died is closed by `close_dead_runs` (see `pipeline.recover`).
The `baselines` command uses the same `Tracker` without a study: one parent, one child run
per baseline. Runs that train or test log their data as MLflow datasets (`log_datasets`), and
with `system_metrics=1` MLflow's own CPU/memory/GPU monitor samples each trial and refit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import keras
import mlflow
import numpy as np
import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pipeline import interrupts, names
from pipeline.config import Settings
from pipeline.data import Lineage
from pipeline.names import mask, prefixed
from pipeline.retries import server_unreachable, tracking_unreachable

PARENT_WAIT = 60  # seconds a worker that did not create the study waits for its parent run
FAIL_REASON = "pipeline.fail_reason"  # MLflow tag (and trial user attr `fail_reason`) of a failed trial
DESCRIPTION = "mlflow.note.content"  # the run page's Markdown description
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's "Machine learning" kind
RACE_TRIES = 3  # attempts of a write that other workers may make at the same moment (`race_safe`)
LINEAGE_TEXT = 500  # characters of a dataset input tag's text kept
SYSTEM_METRICS_INTERVAL = 5  # seconds between samples of `system_metrics=1` (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides)


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def store_client() -> MlflowClient:
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
        if stored := study.user_attrs.get(names.PARENT_RUN):
            return stored
        time.sleep(0.2)
    return None


def race_safe(call, *args, **kwargs):
    """`call(*args, **kwargs)`, once more when another worker wrote the same key at the same
    moment: MLflow's SQL store looks a tag, param or dataset up, then inserts it, and the loser
    of two concurrent inserts breaks the unique key (seen on PostgreSQL: workers tagging the
    study's parent run, logging one dataset, closing one dead trial's run). The next try finds
    the winner's row and updates it."""
    for attempt in range(RACE_TRIES):
        try:
            return call(*args, **kwargs)
        except mlflow.exceptions.MlflowException as e:
            text = str(e).lower()
            if attempt == RACE_TRIES - 1 or not ("unique" in text or "duplicate" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


def end_run(client: MlflowClient, run_id: str, state: str, status: str, reason: str | None = None):
    """Close a trial's run: Optuna's state as a tag, MLflow's status, and why it failed."""
    race_safe(client.set_tag, run_id, "optuna.trial_state", state)
    if reason:
        race_safe(client.set_tag, run_id, FAIL_REASON, mask(reason)[:500])
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


def log_datasets(client: MlflowClient, run_id: str, inputs: list[tuple[Lineage, str]]) -> None:
    """Log (dataset, context) pairs as the run's MLflow dataset inputs, in one round trip:
    name, digest and source, rows and image shape in the profile, classes as an input tag, and
    for an image folder what reading it met (`images_read`, `original_sizes`, `image_size`,
    `skipped`: pipeline.data.reads) as input tags too.
    Only this description is stored: no image leaves the process. A race with another worker
    logging the same dataset (a unique-key conflict in the store) is retried."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    def source(where: str):
        if where.startswith(("http://", "https://")):
            return HTTPDatasetSource(where)
        if where.startswith("/"):
            # MLflow makes its local-file source class at import time (registered, not importable)
            return next(c for c in get_registered_sources() if c.__name__ == "LocalArtifactDatasetSource")(where)
        return CodeDatasetSource(tags={"loader": where})

    entries = []
    for lineage, context in inputs:
        # a read-only view of the right shape: MLflow profiles shapes only, the digest is ours
        features = np.broadcast_to(np.zeros(lineage.shape, np.uint8), (lineage.rows, *lineage.shape))
        dataset = from_numpy(features, source=source(lineage.source), targets=np.zeros(lineage.rows, np.int32),
                             name=lineage.name, digest=lineage.digest)
        tags = [InputTag("mlflow.data.context", context), InputTag("classes", str(lineage.classes))]
        tags += [InputTag(key, text[:LINEAGE_TEXT]) for key, text in lineage.facts]
        entries.append(DatasetInput(dataset._to_mlflow_entity(), tags))
    race_safe(client.log_inputs, run_id, datasets=entries)


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
        self.client.log_metric(self.run_id, names.PARAMS_COUNT, self.model.count_params(), step=self.offset)

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


def _child_tags(parent_run_id: str, device: str, **tags) -> dict:
    return {"mlflow.parentRunId": parent_run_id, **({"device": device} if device else {}), **tags}


class Tracker:
    """The MLflow side of one process: the parent run (of a study, or of the `baselines`
    command when `study` is None), this worker's run under `mlflow run`, and child runs."""

    def __init__(self, settings: Settings, study: optuna.Study | None = None, *, run_name: str = "",
                 wait_for_parent: bool = False, device: str = ""):
        """`run_name`: the parent's name (default: the study's). `wait_for_parent`: another
        worker has just created the study (see `pipeline.study.join_study`) and is about to
        store its parent run id: wait for it. `device`: which device trains, tagged on the
        worker and child runs, and on the parent where it has none yet."""
        self.client = store_client()
        self.settings, self.study, self.device = settings, study, device
        self._loggers: dict[str, list[EpochLogger]] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epoch-log")
        self.worker_run_id = None
        project_run = project_run_id()
        stored = None
        if study is not None:
            stored = study.user_attrs.get(names.PARENT_RUN) or (_wait_for_parent(study) if wait_for_parent else None)
        if stored and _run_exists(self.client, stored):
            self.parent_run_id = stored
            if project_run and project_run != stored:
                self.worker_run_id = project_run
                for k, v in {"mlflow.parentRunId": stored, "pipeline.role": "worker",
                             "mlflow.runName": f"worker-{socket.gethostname()}-{os.getpid()}"}.items():
                    race_safe(self.client.set_tag, project_run, k, v)
        else:
            if project_run:
                self.parent_run_id = project_run
            else:
                experiment = mlflow.set_experiment(settings.experiment_name)
                self.parent_run_id = self.client.create_run(experiment.experiment_id).info.run_id
            if study is not None:
                study.set_user_attr(names.PARENT_RUN, self.parent_run_id)
        parent = self.client.get_run(self.parent_run_id)
        self.experiment_id = parent.info.experiment_id
        name = run_name or study.study_name
        if parent.info.run_name != name:  # also renames the run `mlflow run` made up
            self.client.update_run(self.parent_run_id, name=name)
        experiment = self.client.get_experiment(self.experiment_id)
        if EXPERIMENT_KIND[0] not in experiment.tags:  # a kind the user chose stays
            race_safe(self.client.set_experiment_tag, self.experiment_id, *EXPERIMENT_KIND)
        if self.device:  # the parent keeps the device of the process that tagged it first (`main`, not
            # the workers it starts); each worker's and child run carries its own
            tagged = [self.worker_run_id] + ([] if "device" in parent.data.tags else [self.parent_run_id])
            for run_id in filter(None, tagged):
                race_safe(self.client.set_tag, run_id, "device", self.device)
        if study is not None:
            self._describe_parent(parent)

    def _describe_parent(self, run):
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
            race_safe(self.client.set_tag, self.parent_run_id, k, v)
        if run.info.status != "RUNNING":
            self.client.update_run(self.parent_run_id, status="RUNNING")
        # Params are write-once in MLflow: log the study-defining ones only on first sight.
        if "metric" not in run.data.params:
            for k, v in {"dataset": s.dataset, "search_space": s.search_space, "metric": s.metric,
                         "direction": s.direction, "epochs": s.epochs, "cv_folds": s.cv_folds,
                         "pruner": s.pruner if s.pruning else "none", "seed": s.seed, "storage": mask(s.storage),
                         "objectives": ",".join(s.objective_names), "keras_backend": s.keras_backend,
                         "class_weight": s.class_weight}.items():
                race_safe(self.client.log_param, self.parent_run_id, k, v)

    @property
    def nest_under(self) -> str:
        return self.worker_run_id or self.parent_run_id

    def describe(self, markdown: str) -> None:
        """Set the parent run's Markdown description (the run page's Description)."""
        race_safe(self.client.set_tag, self.parent_run_id, DESCRIPTION, markdown)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, *, resume: bool = False):
        """MLflow's system-metrics monitor on `run_id` while the block runs (`system_metrics=1`)."""
        if not self.settings.system_metrics:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop line per run
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, resume_logging=resume)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def _open(self, run_name: str, tags: dict, params: dict) -> str:
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        return run_id

    @contextlib.contextmanager
    def child_run(self, run_name: str, params: dict, **tags):
        """A run nested under the parent: FINISHED, FAILED on an error, KILLED on Ctrl-C/SIGTERM."""
        run_id = self._open(run_name, _child_tags(self.nest_under, self.device, **tags), params)
        try:
            with self.system_metrics(run_id):
                yield run_id
        except BaseException as e:
            self.end(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.end(run_id, "FINISHED")

    @contextlib.contextmanager
    def trial_run(self, trial: optuna.Trial, params: dict, fidelity: dict | None = None):
        """A nested MLflow run for one trial; its end state mirrors the trial's. `fidelity`: an
        evaluation's rung and what it trains ({rung, fidelity_epochs, fidelity_rows}, with
        promoted_from one rung up): params, and the tags `rung`, `fidelity` ("3 epochs, 1149 rows")
        and `promoted_from`."""
        tags = {"optuna.study_name": self.study.study_name, "optuna.trial_number": str(trial.number),
                "optuna.trial_state": "RUNNING"}
        if names.WARM_START in trial.user_attrs:
            tags["warm_start"] = trial.user_attrs[names.WARM_START]
        if fidelity:
            tags.update(rung=str(fidelity[names.RUNG]),
                        fidelity=f"{fidelity[names.FIDELITY_EPOCHS]} epochs, {fidelity[names.FIDELITY_ROWS]} rows")
            if names.PROMOTED_FROM in fidelity:
                tags[names.PROMOTED_FROM] = str(fidelity[names.PROMOTED_FROM])
        run_id = self._open(f"trial-{trial.number}", _child_tags(self.nest_under, self.device, **tags),
                            {**params, **(fidelity or {})})
        trial.set_user_attr(names.MLFLOW_RUN_ID, run_id)
        try:
            with self.system_metrics(run_id):
                yield run_id
        except optuna.TrialPruned:
            self.end(run_id, "FINISHED", "PRUNED")
            raise
        except Exception as e:
            if server_unreachable(e):  # the run cannot be ended: a later worker closes it (close_dead_runs)
                trial.set_user_attr(names.FAIL_REASON, "tracking server unreachable")
                raise tracking_unreachable(mlflow.get_tracking_uri()) from None
            caught = interrupts.pending()
            if caught is None:
                self.end(run_id, "FAILED", "FAIL", f"{type(e).__name__}: {e}")
                raise
            # the interrupt surfaced as another error (TensorFlow's device scope, exited by the
            # KeyboardInterrupt, raises "Exiting device scope without proper scope nesting" over it)
            self._interrupted(trial, run_id, f"interrupted by {caught}")
            raise KeyboardInterrupt(caught) from e
        except BaseException as e:  # Ctrl-C or SIGTERM (see pipeline.interrupts)
            self._interrupted(trial, run_id, f"interrupted by {str(e) or 'SIGINT'}" if isinstance(e, KeyboardInterrupt)
                              else type(e).__name__)
            raise
        else:
            self.end(run_id, "FINISHED", "COMPLETE")

    def _interrupted(self, trial: optuna.Trial, run_id: str, reason: str) -> None:
        """The trial's user attr `fail_reason` and its run KILLED (the trial then ends FAIL)."""
        trial.set_user_attr(names.FAIL_REASON, reason)
        self.end(run_id, "KILLED", "FAIL", reason)

    def flush(self, run_id: str) -> None:
        """Return once every epoch logged to `run_id` so far is in the store."""
        for logger in self._loggers.pop(run_id, []):
            logger.wait()

    def end(self, run_id: str, status: str, state: str | None = None, reason: str | None = None):
        """End a child run once its epochs are in the store; `state`: the trial's, for a trial."""
        self.flush(run_id)
        if state is None:
            self.client.set_terminated(run_id, status=status)
        else:
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
        if self.study is None or not self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.client.set_terminated(self.parent_run_id, status=status)

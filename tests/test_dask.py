"""Workers as tasks on a live Dask cluster (`cluster=tcp://...`, pipeline.cluster), on one machine:
a `dask scheduler` and `dask worker` processes on 127.0.0.1 (one thread and `--resources cores=1`
each, no nanny: a killed worker stays dead, as a lost machine does), a PostgreSQL study and the
test's MLflow store.

- `main` submits three tasks; one Dask worker is SIGKILLed while its task's trial trains. The
  study still spends its budget, the killed trial ends FAIL and is retried with its params, no
  trial or run is left RUNNING, every trial is one MLflow run under the one parent, trials ran on
  more than one Dask worker, Dask resubmitted the lost task, and `main` refit and tested.
- SIGTERM to a submitting `search` stops its tasks: their trials end FAIL, their runs KILLED.
- Bad input: a default (SQLite) storage, a malformed address, no scheduler: one-line errors.
PostgreSQL tests skip where no server answers at 127.0.0.1:5432 as user postgres.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
from conftest import free_port, runs_of
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.cli import run
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.study import counted_trials, make_storage
from pipeline.tracking import FAIL_REASON
from test_distributed import postgres  # noqa: F401 (a fixture: a fresh database and role)

TINY_SPACE = """\
depth: 1
first_block: {filters: [4, 8, 16], kernel_size: [2, 3], pool_size: 2}
dense: {units: {low: 8, high: 512}}
"""
DASK = str(Path(sys.executable).parent / "dask")  # the command beside this Python's
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")


@pytest.fixture
def dask_cluster(tmp_path):
    """`start(n)`: a scheduler and n one-core workers on 127.0.0.1; returns (address, worker processes).
    Every process (and the search workers its tasks started) is killed at the end."""
    pytest.importorskip("distributed")
    procs = []

    def spawn(name: str, *args) -> subprocess.Popen:
        log = open(tmp_path / f"dask-{name}.log", "w")
        proc = subprocess.Popen([DASK, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        procs.append(proc)
        return proc

    def start(n: int) -> tuple[str, list[subprocess.Popen]]:
        from distributed import Client

        address = f"tcp://127.0.0.1:{free_port()}"
        spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard")
        workers = [spawn(f"worker-{i}", "worker", address, "--nthreads", "1", "--resources", "cores=1", "--no-nanny",
                         "--no-dashboard", "--name", f"w{i}") for i in range(n)]
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=60)
        return address, workers

    yield start
    for proc in procs:  # a worker's process group holds the search workers of its tasks
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture
def cluster_settings(settings, tmp_path, postgres) -> Settings:  # noqa: F811
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    return settings.replace(search_space=str(space), storage=postgres[0], study_name="dask-drill",
                            heartbeat_interval=1, grace_period=3, pruner="none", threads=1)


def studies(s: Settings):
    """`study_of()`: the study of `s` (KeyError until a worker makes it), through one storage."""
    storage = make_storage(s.storage)
    return lambda: optuna.load_study(study_name=s.study, storage=storage)


def trial_runs(experiment: str) -> dict[int, list]:
    by_number = {}
    for r in runs_of(experiment):
        if "optuna.trial_number" in r.data.tags:
            by_number.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
    return by_number


def training(study_of, timeout: float = 120, count: int = 1) -> list[optuna.trial.FrozenTrial]:
    """`count` RUNNING trials of a Dask task whose MLflow run has logged an epoch."""
    client, deadline = MlflowClient(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = study_of().get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:  # no study yet
            running = []
        found = [t for t in running if names.DASK_WORKER in t.user_attrs and names.MLFLOW_RUN_ID in t.user_attrs
                 and "val_accuracy" in client.get_run(t.user_attrs[names.MLFLOW_RUN_ID]).data.metrics]
        if len(found) >= count:
            return found[:count]
        time.sleep(0.3)
    raise AssertionError(f"no {count} trial(s) training on the cluster in {timeout} s")


@pytest.mark.drill
@pytest.mark.slow
def test_main_on_a_dask_cluster_survives_a_killed_worker_and_refits(dask_cluster, cluster_settings, digits):
    address, _ = dask_cluster(3)
    # ten trials: the two surviving workers keep starting trials for longer than the grace period
    # (3 s) after the kill, so one of them finds the dead trial stale and runs its retry
    s = cluster_settings.replace(cluster=address, workers=3, n_trials=10, epochs=6, patience=6, refit_epochs=1)
    study_of = studies(s)
    killed, errors = {}, []

    def kill_a_worker():  # the Dask worker process whose task's search worker trains the first trial found
        try:
            trial = training(study_of)[0]
            worker = psutil.Process(trial.user_attrs[names.WORKER_PID]).parent()
            killed.update(child=trial.user_attrs[names.WORKER_PID], pid=worker.pid,
                          address=trial.user_attrs[names.DASK_WORKER])
            worker.kill()
        except Exception as e:
            errors.append(e)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    metrics = run("main", s, data=digits)
    killer.join()
    assert not errors, errors
    assert 0 < metrics["test_accuracy"] <= 1, "main refit and tested"

    study = study_of()
    trials = {t.number: t for t in study.trials}
    assert s.n_trials <= counted_trials(study) <= s.n_trials + 2, [t.state.name for t in study.trials]
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    # the trial the killed worker's search process was running (the one found training, or its
    # next where that one ended between being found and the kill): failed as its worker died
    on_killed = [t for t in study.trials if t.user_attrs.get(names.WORKER_PID) == killed["child"] and t.state.name == "FAIL"]
    assert len(on_killed) == 1, [(t.number, t.state.name) for t in study.trials]
    dead = on_killed[0]
    assert dead.user_attrs[names.DASK_WORKER] == killed["address"]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == dead.params
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len({t.user_attrs[names.DASK_WORKER] for t in done}) >= 2, "trials ran on more than one Dask worker"
    assert sorted(os.listdir(f"worker-logs/{s.study}")) == ["task-0.log", "task-1.log", "task-2.log"], \
        "each task returned, the lost one resubmitted to a surviving worker"

    parent_id = study.user_attrs[names.PARENT_RUN]
    runs = runs_of(s.experiment_name)
    assert [r.info.run_id for r in runs if r.data.tags.get("pipeline.role") == "study"] == [parent_id]
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_number = trial_runs(s.experiment_name)
    assert sorted(by_number) == sorted(trials) and all(len(rs) == 1 for rs in by_number.values())
    assert all(rs[0].data.tags["mlflow.parentRunId"] == parent_id for rs in by_number.values())
    lost = by_number[dead.number][0]
    assert lost.info.status == "FAILED" and "worker died" in lost.data.tags[FAIL_REASON]
    parent = MlflowClient().get_run(parent_id)
    assert parent.info.status == "FINISHED" and "test_accuracy" in parent.data.metrics


@pytest.mark.drill
def test_sigterm_to_the_submitting_process_stops_the_tasks_and_fails_their_trials(dask_cluster, cluster_settings):
    address, _ = dask_cluster(2)
    s = cluster_settings.replace(cluster=address, workers=2, n_trials=20, epochs=300, patience=300)
    study_of = studies(s)
    log = open("submitter.log", "w+")
    submitter = subprocess.Popen([sys.executable, "-m", "pipeline", *s.argv("search")], stdout=log,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        stopped = training(study_of, count=2)
        submitter.send_signal(signal.SIGTERM)
        code = submitter.wait(timeout=90)
    finally:
        if submitter.poll() is None:
            submitter.kill()
        log.seek(0)
        out = log.read()
    assert code == 143, out
    assert "interrupted by SIGTERM" in out and "Traceback" not in out, out
    study = study_of()
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    by_number = trial_runs(s.experiment_name)
    for trial in stopped:
        assert study.trials[trial.number].state.name == "FAIL"
        assert study.trials[trial.number].user_attrs[names.FAIL_REASON] == "interrupted by SIGTERM"
        assert by_number[trial.number][0].info.status == "KILLED"
    assert len({t.user_attrs[names.DASK_WORKER] for t in stopped}) == 2


def test_a_cluster_needs_a_shared_storage_and_a_scheduler_address():
    with pytest.raises(PipelineError, match=r"^storage='sqlite:///optuna.db': .* pass --storage postgresql://"):
        Settings(cluster="tcp://127.0.0.1:8786")
    with pytest.raises(PipelineError, match=r"^cluster='127.0.0.1:8786': expected a Dask scheduler address"):
        Settings(cluster="127.0.0.1:8786", storage="postgresql://u@db/optuna")
    assert Settings(cluster="tcp://h:8786", storage="journal:///srv/study.journal").cluster == "tcp://h:8786"


def test_no_scheduler_at_the_address_is_a_one_line_error_before_any_data_loads(settings, monkeypatch):
    pytest.importorskip("distributed")
    from pipeline.cluster import submit

    monkeypatch.setattr(submit, "CONNECT_TIMEOUT", 3)
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(PipelineError, match=f"^cluster={address}: no Dask scheduler answered within 3 s"):
        run("search", settings.replace(cluster=address, storage="postgresql://u@127.0.0.1:1/optuna"))
    assert time.monotonic() - start < 15

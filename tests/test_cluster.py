"""The many-machines drill, on one machine: `deploy/stack.py up` makes a PostgreSQL role and
databases and starts an MLflow server that proxies artifacts over HTTP; workers know only the
tracking URL and the storage URL (the password in PGPASSWORD).

Three workers share a study with a budget of 6 trials. Two of them train long trials
(stand-ins for a big model) and die mid-trial: one by SIGKILL, one by SIGTERM. A new
worker joins and, with the survivor, spends the budget; the SIGKILLed trial is failed by
its stale heartbeat and retried. Then `refit` runs from a process whose environment holds
only the two URLs and the password, and the registered model is served from the server.
Skips only where no PostgreSQL server answers at 127.0.0.1:5432 as user postgres.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import ROOT, free_port, serve_and_ask
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.report import STUDY_PLOTS
from pipeline.study import counted_trials, make_storage
from pipeline.tracking import FAIL_REASON, log_datasets
from test_distributed import postgres  # noqa: F401 (a fixture: a fresh database and role)

STACK = [sys.executable, str(ROOT / "deploy" / "stack.py")]
TINY_SPACE = """\
depth: 1
first_block: {filters: [4, 8, 16], kernel_size: [2, 3], pool_size: 2}
dense: {units: {low: 8, high: 512}}
"""
BUDGET = 6
SHORT = ["--epochs", "2", "--patience", "1"]
LONG = ["--epochs", "5000", "--patience", "5000", "--pruner", "none"]  # a trial that trains until it is killed
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")


class Stack:
    """The stack `deploy/stack.py up` started in `folder`, and the `workers` commands run on it."""

    def __init__(self, folder: Path, space_file: Path):
        self.folder, self.supervisors = folder, []
        self.env = {}
        for line in (folder / "env").read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = value.strip("'")
        self.uri, self.password = self.env["MLFLOW_TRACKING_URI"], self.env["PGPASSWORD"]
        self.storage = self.env["OPTUNA_STORAGE"]
        self.common = ["--study-name", "drill", "--experiment-name", "drill", "--search-space", str(space_file),
                       "--n-trials", str(BUDGET), "--heartbeat-interval", "1", "--grace-period", "3", "--threads", "1"]

    def workers(self, n: int, *args) -> tuple[subprocess.Popen, list[int]]:
        """`stack.py workers n -- ...` in its own process group; returns it and its workers' pids."""
        proc = subprocess.Popen([*STACK, "workers", str(n), "--dir", str(self.folder), "--", *self.common, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.supervisors.append(proc)
        pids = [int(proc.stdout.readline().split()[1].rstrip(":")) for _ in range(n)]
        return proc, pids

    def study(self) -> optuna.Study:
        """The drill's study (KeyError until a worker creates it); one storage, reused."""
        self._storage = getattr(self, "_storage", None) or make_storage(self.storage)
        return optuna.load_study(study_name="drill", storage=self._storage)

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in self.folder.glob("*.log"))


@pytest.fixture
def stack(tmp_path, monkeypatch):
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3).close()
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL server answers at 127.0.0.1:5432 as user postgres ({str(e).strip()})")
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(TINY_SPACE)
    folder = tmp_path / "stack"
    up = subprocess.run([*STACK, "up", "--dir", str(folder), "--port", str(free_port())], capture_output=True,
                        text=True, timeout=200)
    s = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        s = Stack(folder, space_file)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", s.uri)
        monkeypatch.setenv("PGPASSWORD", s.password)  # what this process's `make_storage` expands
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(s.uri)
        yield s
    finally:
        mlflow.set_tracking_uri(None)
        for proc in s.supervisors if s else []:  # a supervisor and its workers share a process group
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if (folder / "stack.json").exists():
            subprocess.run([*STACK, "down", "--dir", str(folder), "--drop", "--wait", "5"], timeout=60)


def wait_for_trial(s: Stack, pid: int, training: bool = True, timeout: float = 150) -> optuna.trial.FrozenTrial:
    """A trial of worker `pid`: RUNNING, once its MLflow run on the server has logged an epoch
    (`training`), or any trial it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = s.study()
        except KeyError:  # not created yet
            study = None
        for trial in study.get_trials() if study else []:
            run_id = trial.user_attrs.get(names.MLFLOW_RUN_ID)
            if trial.user_attrs.get(names.WORKER_PID) != pid or not run_id:
                continue
            if not training:
                return trial
            if trial.state.name == "RUNNING":
                run = MlflowClient().get_run(run_id)
                if run.info.status == "RUNNING" and "val_accuracy" in run.data.metrics:
                    return trial
        time.sleep(0.5)
    raise AssertionError(f"worker {pid} did not start training in {timeout} s:\n{s.logs()[-3000:]}")


@pytest.mark.drill
@pytest.mark.slow
def test_the_stack_survives_killed_workers_and_serves_the_refit_model(stack, tmp_path):
    s = stack
    victims, (killed, stopped) = s.workers(2, *LONG)
    killed_trial, stopped_trial = wait_for_trial(s, killed), wait_for_trial(s, stopped)
    survivor, (third,) = s.workers(1, *SHORT)  # joins once the others hold their long trials
    wait_for_trial(s, third, training=False)
    os.kill(killed, signal.SIGKILL)
    os.kill(stopped, signal.SIGTERM)
    joined, _ = s.workers(1, *SHORT)
    out = victims.communicate(timeout=60)[0]
    assert f"worker {killed}: exit code -9" in out and f"worker {stopped}: exit code 143" in out, out
    for proc in (survivor, joined):
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out + s.logs()[-3000:]

    refit_env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "MLFLOW_TRACKING_URI": s.uri,
                 "PGPASSWORD": s.password, "PYTHONPATH": str(ROOT)}
    refit = subprocess.run([sys.executable, "-m", "pipeline", "refit", *s.common, "--storage", s.storage,
                            "--system-metrics", "1"], env=refit_env, capture_output=True, text=True,
                           timeout=300)
    assert refit.returncode == 0, refit.stdout + refit.stderr
    assert f"browse the runs:  {s.uri}/#/experiments/" in refit.stdout, "the server's own UI"

    # Optuna: the budget holds, nothing is left running, the SIGKILLed trial was retried
    study = s.study()
    assert BUDGET <= counted_trials(study) <= BUDGET + 3, [t.state.name for t in study.trials]
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    trials = {t.number: t for t in study.trials}
    assert trials[killed_trial.number].state.name == "FAIL"
    assert trials[stopped_trial.number].user_attrs["fail_reason"] == "interrupted by SIGTERM"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_trial.number]
    assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED")
    assert retried[0].params == killed_trial.params

    # MLflow: one parent, exactly one run per trial number under it, none left RUNNING
    client = MlflowClient()
    experiment = client.get_experiment_by_name("drill")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parent_id = study.user_attrs[names.PARENT_RUN]
    assert [r.info.run_id for r in runs if r.data.tags.get("pipeline.role") == "study"] == [parent_id]
    by_number = {}
    for run in runs:
        if "optuna.trial_number" in run.data.tags:
            assert run.data.tags["mlflow.parentRunId"] == parent_id
            by_number.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    assert sorted(by_number) == sorted(trials) and all(len(rs) == 1 for rs in by_number.values())
    dead, interrupted = by_number[killed_trial.number][0], by_number[stopped_trial.number][0]
    assert dead.info.status == "FAILED" and "worker died" in dead.data.tags[FAIL_REASON]
    assert interrupted.info.status == "KILLED"

    # every artifact comes through the server: the parent's files and the registered model
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, dst_path=str(tmp_path / "parent")))
    expected = {f"{p}.{ext}" for p in STUDY_PLOTS for ext in ("html", "png")} | {
        "trials.csv", "classification_report.txt", "classification_report.json", "best_params.json",
        "confusion_matrix.png", "confusion_matrix_normalized.png", "model_input_example.json", "class_names.json"}
    assert expected <= {p.name for p in folder.iterdir()}
    assert all((folder / name).stat().st_size > 0 for name in expected)
    model = Path(mlflow.artifacts.download_artifacts("models:/drill/1", dst_path=str(tmp_path / "model")))
    assert (model / "MLmodel").is_file()

    example = json.loads((folder / "model_input_example.json").read_text())
    answer = serve_and_ask("models:/drill/1", example, s.uri, timeout=120)
    assert len(answer["predictions"]) == 4 and all("class" in p for p in answer["predictions"])

    # the password is nowhere: logs of every process, params and tags of every run
    assert s.password not in s.logs() + refit.stdout + refit.stderr
    for run in runs + [parent]:
        assert s.password not in json.dumps([run.data.params, run.data.tags])


def test_workers_logging_one_dataset_at_once_all_succeed(postgres, _digits, monkeypatch):  # noqa: F811
    """MLflow's SQL store looks a dataset up, then inserts it: six runs logging a new dataset
    at the same moment race for its row, and each must still log it (`log_datasets` retries)."""
    url, _ = postgres
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("postgresql://", "postgresql+psycopg2://"))
    client = MlflowClient()
    experiment_id = client.create_experiment("race")
    errors = []

    def log(run_id, lineage, barrier):
        barrier.wait()
        try:
            log_datasets(MlflowClient(), run_id, [(lineage, "training")])
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    for rows in (100, 101, 102):  # a new dataset (digest) each round
        lineage, barrier = _digits.lineage(_digits.x_train[:rows], _digits.y_train[:rows]), threading.Barrier(6)
        threads = [threading.Thread(target=log, args=(client.create_run(experiment_id).info.run_id, lineage, barrier))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    runs = client.search_runs([experiment_id])
    assert len(runs) == 18 and all(len(r.inputs.dataset_inputs) == 1 for r in runs)

"""Shared fixtures: shrink the config instead of mocking anything.

Every test gets a real MLflow tracking store (SQLite) and a real Optuna storage (SQLite)
in its own temp dir; the digits data set is loaded once per session and handed out with
a fresh, sealed test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# precision=auto trains in float32 on every machine kind, as on a CPU without bfloat16 (pipeline.device):
# the suite's results and device tags do not depend on the CPU (PIPELINE_CPU_FLAGS=avx512_bf16 runs it in bfloat16)
os.environ.setdefault("PIPELINE_CPU_FLAGS", "")

from pipeline.config import Settings  # noqa: E402


def pytest_collection_modifyitems(items):
    """The files with `slow` tests first, so that on several workers (`pytest -n`) no long test
    starts last; each file's tests stay together and in order (module fixtures are made once)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: making them (MLflow's schema migrations)
    takes about 4 s of CPU, which every test with a store of its own would pay again."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    with contextlib.chdir(path.parent):  # the Default experiment's artifacts: the store's folder, not the checkout
        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session", autouse=True)
def _frozen_libraries(_empty_store):
    """The libraries a pipeline run loads, loaded before the first test and then kept out of the
    garbage collector's reach for the session, as a `python -m pipeline` process keeps its own
    (pipeline.process): no collection during a test rescans their 800,000 objects (about 0.17 s
    each time, ~70 times in test_pipeline, test_beyond and test_visible alone). Making the
    MLflow store loaded its SQLAlchemy and Alembic modules. A search then freezes what is alive
    at its start, as in a pipeline process (pipeline.search.run_search): a test's stores and data
    stay for the session (about 2 MB and 2 file descriptors a search)."""
    import mlflow.keras  # noqa: F401
    import mlflow.pyfunc  # noqa: F401

    import pipeline.core  # noqa: F401
    import pipeline.report  # noqa: F401
    import pipeline.serving  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Each test, and every process it starts, runs in its temp dir, as a user runs `cnn-search`
    in a folder of their own: a local MLflow store keeps its artifacts in `./mlruns`, which is
    then there, not in the checkout (about 600 MB a suite run), and the defaults are found from
    there as a user's are (pipeline.space.project_file)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def tracking_uri(request, tmp_path, monkeypatch):
    """A new MLflow store for this test, also seen by subprocesses: a copy of an empty one,
    or, for tests marked `fresh_store` (workers racing to make its tables), no file at all."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    if request.node.get_closest_marker("fresh_store") is None:
        shutil.copyfile(request.getfixturevalue("_empty_store"), tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID to os.environ; recording the variable
    # first makes the teardown remove it, so no later subprocess (`mlflow run`) inherits it.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment exports it to subprocesses


@pytest.fixture
def settings(tmp_path, tracking_uri) -> Settings:
    """A tiny configuration: 3 trials of 2 epochs on digits, in temp storages."""
    return Settings(
        dataset="digits",
        search_space=str(ROOT / "search_spaces" / "seed.yaml"),
        n_trials=3,
        epochs=2,
        storage=f"sqlite:///{tmp_path}/optuna.db",
        study_name="test-study",
        experiment_name="test-experiment",
    )


@pytest.fixture(scope="session")
def _digits():
    from pipeline.data import load_digits

    return load_digits(seed=42)


@pytest.fixture
def digits(_digits):
    """The digits data set with a fresh, unopened test split."""
    from pipeline.data import HeldOut

    return dataclasses.replace(_digits, test=HeldOut(_digits.test.x, _digits.test.y))


def runs_of(experiment_name: str):
    """All runs of an experiment as a list of mlflow Run objects. The pipeline's client: on a
    fresh SQLite store it takes the workers' lock, so polling while a worker creates the
    store's tables cannot race it (a worker died in MLflow's migration that way)."""
    from pipeline.tracking import store_client

    client = store_client()
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(model_uri: str, payload: dict, tracking_uri: str, timeout: float = 60) -> dict:
    """`mlflow models serve` a model of `tracking_uri` (its own process group), POST `payload`
    to /invocations until it answers or `timeout` passes, stop the server; returns the answer."""
    import json
    import signal
    import subprocess
    import time
    import urllib.request

    port, bin_dir = free_port(), str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "MLFLOW_TRACKING_URI": tracking_uri}
    server = subprocess.Popen(
        [f"{bin_dir}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
                                     data=json.dumps(payload).encode())
    answer, deadline = None, time.monotonic() + timeout
    try:
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            _, err = server.communicate()
    assert answer is not None, err.decode()[-2000:]
    return answer

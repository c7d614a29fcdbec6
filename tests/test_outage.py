"""A study database that goes away: real PostgreSQL behind a TCP relay the test cuts, as a
server restart or a network outage would. A short outage is ridden out with one retry line
per attempt; a longer one fails the running trial with a one-line error (exit 75), and the
study resumes once the database is back. A tracking server that does not answer at the start
(a closed port), or answers every request with an error, ends a command with a one-line error
and exit 75 within the worker's patience, not MLflow's minutes. (The tracking server's restart
and a real PostgreSQL restart: `deploy/drill.py`, figures in bench/README.md.)
"""

from __future__ import annotations

import http.server
import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import mlflow
import optuna
import pytest
from conftest import free_port
from test_distributed import TINY_SPACE, postgres  # noqa: F401  (a fixture)
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.retries import START_PATIENCE, Unreachable, log_retries, tracking_patience
from pipeline.study import make_storage


class Relay:
    """TCP from a free local port to PostgreSQL. `down()` closes the port and every relayed
    connection, as a stopping server does; `up()` listens on the same port again."""

    def __init__(self, target=("127.0.0.1", 5432)):
        self.target, self.connections = target, []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.up()

    def up(self):
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for c in self.connections:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.connections = []

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.connections += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass


@pytest.fixture
def relayed(postgres):  # noqa: F811
    """(URL through a relay, direct URL, password, the relay)."""
    url, password = postgres
    relay = Relay()
    yield url.replace(":5432/", f":{relay.port}/"), url, password, relay
    relay.listener.close()


@pytest.mark.drill
def test_a_storage_call_rides_out_a_short_outage_and_says_so(relayed, capfd):
    url, _, password, relay = relayed
    storage = make_storage(url, heartbeat_interval=1, grace_period=12)  # waits up to 11 s
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    relay.down()
    threading.Timer(3, relay.up).start()
    start = time.monotonic()
    trials = storage.get_all_trials(storage.get_study_id_from_name("s"))
    waited = time.monotonic() - start
    assert len(trials) == 2 and 2.5 < waited < 11
    err = capfd.readouterr().err
    assert "the study database: " in err and "retry 1 in 1.0 s" in err and "retry 2 in 2.0 s" in err
    assert password not in err


@pytest.mark.drill
def test_a_longer_outage_ends_in_a_one_line_error_after_the_patience(relayed):
    url, _, password, relay = relayed
    storage = make_storage(url, heartbeat_interval=1, grace_period=4)  # waits up to 3 s
    optuna.create_study(storage=storage, study_name="s")
    relay.down()
    start = time.monotonic()
    with pytest.raises(Unreachable, match=r"^the study database did not answer for 3 s \(") as e:
        storage.get_study_id_from_name("s")
    assert 2.5 < time.monotonic() - start < 6
    assert "\n" not in str(e.value) and password not in str(e.value)


@pytest.mark.drill
@pytest.mark.slow
def test_a_worker_fails_its_trial_cleanly_when_the_database_stays_away_and_the_study_resumes(
        relayed, tmp_path, tracking_uri, monkeypatch):
    url, direct, password, relay = relayed
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    monkeypatch.setenv("PGPASSWORD", password)
    args = ["search", "--dataset", "digits", "--search-space", str(space), "--storage",
            url.replace(password, "$PGPASSWORD"), "--study-name", "s", "--n-trials", "3", "--experiment-name",
            "outage", "--heartbeat-interval", "1", "--grace-period", "4"]
    first = subprocess.Popen(  # a trial that reports each epoch and runs until cut
        [sys.executable, "-m", "pipeline", *args, "--threads", "1", "--epochs", "300", "--patience", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = make_storage(direct)
    deadline = time.monotonic() + 120
    while not any(t.intermediate_values for t in _trials(storage)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.5)
    relay.down()
    start = time.monotonic()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 75, err[-3000:]
    assert time.monotonic() - start < 20  # the patience (3 s) for the report, then for the FAIL
    assert "Traceback" not in err and password not in err
    lines = err.strip().splitlines()
    assert any(" retry 1 in 1.0 s" in line for line in lines)
    assert lines[-2].startswith("error: the study database did not answer for 3 s (")
    assert lines[-1].startswith("resume: python -m pipeline search --study-name s")

    relay.up()
    assert main([*args, "--epochs", "2"]) == 0  # the second worker: in this process
    states = [t.state for t in _trials(storage)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3, states
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and optuna.trial.TrialState.RUNNING not in states
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs)


def _trials(storage):
    return storage.get_all_trials(storage.get_study_id_from_name("s")) if storage.get_all_studies() else []


def pipeline(*args, env):
    """`python -m pipeline ...` with `env` over this environment; well inside 60 s or a failure."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_a_tracking_server_that_does_not_answer_at_the_start_is_one_line_and_exit_75(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # bound, then closed: nothing listens
    result = pipeline("main", "--dataset", "digits", "--storage", f"sqlite:///{tmp_path}/optuna.db",
                      env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 75 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: the tracking server {uri} did not answer for {START_PATIENCE} s " \
                        "([Errno 111] Connection refused)", lines
    assert all(line.startswith(f"the tracking server {uri}: [Errno 111] Connection refused; retry ")
               for line in lines[:-1]), lines
    assert not (tmp_path / "optuna.db").exists(), "nothing was made"


def test_retry_lines_go_to_the_stderr_of_the_command_that_runs(monkeypatch):
    """A process that runs several commands (a test session, a notebook) may swap sys.stderr,
    and close the old one, between them: each command's retry lines go to its own."""
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log_retries()
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    log_retries()
    logging.getLogger("urllib3.connectionpool").debug("Retry: %s", "/api/2.0/mlflow/runs/get")
    assert second.getvalue() == "tracking server: an error status; retrying /api/2.0/mlflow/runs/get\n"


class Failing(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers every request 503 (overloaded), counting MLflow's."""
    api_requests = 0

    def do_GET(self):
        if self.path.startswith("/api/"):
            type(self).api_requests += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PATCH = do_DELETE = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.drill
@pytest.mark.parametrize("env", [{}, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}], ids=["derived", "user-set"])
def test_a_worker_waits_for_a_failing_tracking_server_as_long_as_its_patience(tmp_path, env, monkeypatch, capsys):
    """grace_period 6 - heartbeat_interval 1: a patience of 5 s, so 2 retries of MLflow's client
    (MLflow's own default: 7, about 4 minutes); a user's MLFLOW_HTTP_REQUEST_MAX_RETRIES wins.
    The worker runs in this process (`pipeline.cli.main`), which sets the environment's
    MLflow retries for the command only."""
    Failing.api_requests = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    for name, value in {"MLFLOW_TRACKING_URI": uri, **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    try:
        code = main(["search", "--dataset", "digits", "--storage", f"sqlite:///{tmp_path}/optuna.db",
                     "--n-trials", "1", "--epochs", "1", "--grace-period", "6", "--heartbeat-interval", "1"])
    finally:
        server.shutdown()
        server.server_close()
    stderr = capsys.readouterr().err
    assert code == 75 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: the tracking server {uri} did not answer within a worker's patience "
        "(grace_period - heartbeat_interval s; MLFLOW_HTTP_REQUEST_MAX_RETRIES overrides)")
    retries = int(env.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or tracking_patience(5)["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert Failing.api_requests == retries + 1, stderr[-3000:]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ or env, "the command's own retries are undone"
    assert mlflow.active_run() is None, "no run left open in the process"

"""Distributed, resumable, crash-safe studies with real worker processes and real storages:
two workers share a study on a journal file within the global budget (on PostgreSQL: the
cluster drill, tests/test_cluster.py),
a SIGKILLed worker's trial is failed, retried and its MLflow run closed, Ctrl-C and SIGTERM
end the running trial as KILLED and the study resumes, a password never reaches MLflow.

PostgreSQL tests use 127.0.0.1:5432 (user postgres), the MySQL test 127.0.0.1:3306 (user root,
no password; MySQL or MariaDB); each skips when no server answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from conftest import runs_of
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recover import HOST
from pipeline import names
from pipeline.core import run_study
from pipeline.space import load_space
from pipeline.study import counted_trials, make_storage, open_study
from pipeline.tracking import FAIL_REASON

TINY_SPACE = """\
depth: 1
first_block: {filters: [4, 8, 16], kernel_size: [2, 3], pool_size: 2}
dense: {units: {low: 8, high: 512}}
"""
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
SLOW = ["--epochs", "300", "--patience", "300", "--pruner", "none"]  # a trial that runs until killed


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return str(path)


@pytest.fixture
def postgres():
    """(URL with a password, the password) of a fresh database owned by a fresh role."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL server answers at 127.0.0.1:5432 as user postgres ({str(e).strip()})")
    admin.autocommit = True
    name, password = f"pipeline_test_{uuid.uuid4().hex[:12]}", f"Pw{uuid.uuid4().hex}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (password,))
        cur.execute(f"CREATE DATABASE {name} OWNER {name}")
    yield f"postgresql://{name}:{password}@127.0.0.1:5432/{name}", password
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"DROP ROLE IF EXISTS {name}")
    admin.close()


@pytest.fixture
def mysql():
    """(URL with a password, the password) of a fresh MySQL/MariaDB database and user."""
    pymysql = pytest.importorskip("pymysql")
    try:
        admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=3,
                                autocommit=True)
    except pymysql.err.MySQLError as e:
        pytest.skip(f"no MySQL server answers at 127.0.0.1:3306 as user root without a password ({e})")
    name, password = f"pipeline_test_{uuid.uuid4().hex[:12]}", f"Pw{uuid.uuid4().hex}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
        cur.execute(f"CREATE USER '{name}'@'%%' IDENTIFIED BY %s", (password,))
        cur.execute(f"GRANT ALL PRIVILEGES ON {name}.* TO '{name}'@'%'")
    yield f"mysql://{name}:{password}@127.0.0.1:3306/{name}", password
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"DROP USER IF EXISTS '{name}'@'%'")
    admin.close()


@pytest.fixture(params=["journal", "postgresql"])
def storage(request, tmp_path):
    if request.param == "journal":
        return f"journal:///{tmp_path}/study.journal"
    return request.getfixturevalue("postgres")[0]


class Workers:
    """`python -m pipeline <command>` processes on one study (all killed at teardown), and the
    same commands run in this process."""

    def __init__(self, tmp_path, space_file, storage):
        self.tmp_path, self.storage, self.procs = tmp_path, storage, []
        self.common = ["--search-space", space_file, "--storage", storage, "--study-name", "dist",
                       "--experiment-name", "dist", "--heartbeat-interval", "1", "--grace-period", "3"]

    def start(self, *args, command="search", env=None) -> subprocess.Popen:
        """A worker whose stacks `finish` can dump (faulthandler) when it does not end."""
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "w+")
        argv = [sys.executable, "-X", "faulthandler", "-m", "pipeline", command, *self.common, *args]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        proc.log = log
        self.procs.append(proc)
        return proc

    def finish(self, proc, timeout=240) -> tuple[int, str]:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # -X faulthandler: the log gets every thread's stack
            proc.wait()
            proc.log.seek(0)
            raise AssertionError(f"worker still running after {timeout} s:\n{proc.log.read()}") from None
        proc.log.seek(0)
        return code, proc.log.read()

    def here(self, capsys, *args, command="search") -> tuple[int, str]:
        """The same command in this process (`pipeline.cli.main`): for a worker that is neither
        killed nor signalled, without a process's imports (5-13 s of CPU)."""
        capsys.readouterr()
        code = main([command, *self.common, *args])
        out = capsys.readouterr()
        return code, out.out + out.err

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="dist", storage=make_storage(self.storage))

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.log.close()


@pytest.fixture
def workers(tmp_path, space_file, tracking_uri, storage):
    w = Workers(tmp_path, space_file, storage)
    yield w
    w.close()


@pytest.fixture
def sqlite_workers(tmp_path, space_file, tracking_uri):
    w = Workers(tmp_path, space_file, f"sqlite:///{tmp_path}/optuna.db")
    yield w
    w.close()


def trial_runs() -> dict[int, list]:
    """MLflow trial runs of the study by trial number."""
    runs = {}
    for run in runs_of("dist"):
        if "optuna.trial_number" in run.data.tags:
            runs.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    return runs


def wait_until_training(timeout=120, proc=None):
    """Wait until a trial's MLflow run is RUNNING and has logged an epoch; return it. `proc`:
    the worker whose log the failure shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = [r for rs in trial_runs().values() for r in rs
                       if r.info.status == "RUNNING" and "val_accuracy" in r.data.metrics]
        except Exception:  # the experiment does not exist yet
            running = []
        if running:
            return running[0]
        time.sleep(0.3)
    log = ""
    if proc is not None:
        proc.log.seek(0)
        log = proc.log.read()[-4000:]
    raise AssertionError(f"no trial started training in time; the worker's log ends:\n{log}")


@pytest.mark.drill
@pytest.mark.slow
@pytest.mark.fresh_store  # the workers make the store's tables at once
@pytest.mark.parametrize("storage", ["journal"], indirect=True)
def test_workers_share_one_study_within_the_global_budget(workers):
    """As README's "Several GPUs on one machine" starts them: one worker per GPU, one storage.
    On a journal file; workers sharing a PostgreSQL study are the cluster drill's (test_cluster),
    a password kept out of MLflow is the MySQL test's below and the drill's."""
    procs = [workers.start("--n-trials", "8", "--epochs", "1", env={"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(2)]
    results = [workers.finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0], results

    study = workers.study()
    assert 8 <= counted_trials(study) <= 10, [t.state for t in study.trials]
    configurations = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(configurations) == len(study.trials), "workers with one seed must not draw the same configurations"
    assert len({t.user_attrs["worker_pid"] for t in study.trials}) == 2, "the workers shared the trials"

    runs = runs_of("dist")
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "study"]
    assert [p.info.run_id for p in parents] == [study.user_attrs[names.PARENT_RUN]], "one parent run per study"
    by_number = trial_runs()
    assert sorted(by_number) == [t.number for t in study.trials]
    assert all(len(rs) == 1 for rs in by_number.values()), "exactly one MLflow run per trial number"
    gpu_of_pid = {p.pid: str(i) for i, p in enumerate(procs)}
    for number, (run,) in by_number.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        pid = study.trials[number].user_attrs["worker_pid"]
        assert run.data.tags["device"].endswith(f"; CUDA_VISIBLE_DEVICES={gpu_of_pid[pid]})"), run.data.tags["device"]


@pytest.mark.drill
@pytest.mark.slow
def test_a_killed_worker_trial_is_failed_retried_and_its_run_closed(workers, storage, capsys):
    doomed = workers.start("--n-trials", "1", *SLOW)
    victim = wait_until_training()
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    study = workers.study()
    assert [t.state.name for t in study.trials] == ["RUNNING"]
    assert victim.info.run_id == study.trials[0].user_attrs["mlflow_run_id"]

    if storage.startswith("journal"):  # no heartbeat: recovered by process id, here on demand
        code, out = workers.here(capsys, command="recover")
        assert code == 0 and "failed and requeued dead trials [0], closed their MLflow runs [0]" in out, out
        assert [t.state.name for t in workers.study().trials] == ["FAIL", "WAITING"]
    else:
        time.sleep(3)  # past the grace period: the heartbeat is stale

    code, out = workers.here(capsys, "--n-trials", "1", "--epochs", "1")  # the retried trial completes the study
    assert code == 0, out
    study = workers.study()
    assert study.trials[0].state.name == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == study.trials[0].params
    assert counted_trials(study) == 1

    runs = trial_runs()
    assert all(len(rs) == 1 for rs in runs.values()), "exactly one MLflow run per trial number"
    assert sorted(runs) == [t.number for t in study.trials]
    dead = runs[0][0]
    assert dead.info.status == "FAILED" and dead.data.tags["optuna.trial_state"] == "FAIL"
    assert "worker died" in dead.data.tags[FAIL_REASON]
    assert runs[retried[0].number][0].info.status == "FINISHED"


@pytest.mark.drill
@pytest.mark.slow
def test_ctrl_c_and_sigterm_kill_the_running_trial_and_the_study_resumes(sqlite_workers):
    """Ctrl-C stops a worker; a second one resumes the study (same parent run, next trial
    number) and is stopped by SIGTERM. Each time the running trial ends FAIL in Optuna and
    KILLED in MLflow, and the process says so and how to resume in two lines, no traceback."""
    w = sqlite_workers
    parent_id = None
    for number, (sig, code, name) in enumerate([(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")]):
        proc = w.start("--n-trials", "3", *SLOW)
        run = wait_until_training(proc=proc)
        assert run.data.tags["optuna.trial_number"] == str(number)
        parent_id = parent_id or run.data.tags["mlflow.parentRunId"]
        assert run.data.tags["mlflow.parentRunId"] == parent_id, "the resumed study keeps its parent run"
        assert MlflowClient().get_run(parent_id).info.status == "RUNNING", "and reopens it"
        proc.send_signal(sig)
        exit_code, out = w.finish(proc, timeout=60)
        assert exit_code == code, out
        assert "Traceback" not in out and "Exception ignored" not in out and f"Trial {number} failed" not in out, out
        lines = out.split("\n")  # each on its own line, not after a refresh of the progress bar ("\r...")
        assert any(line.startswith(f"interrupted by {name}: the running trial is marked FAIL") for line in lines), out
        assert any(line.startswith("resume: python -m pipeline search --study-name dist --storage sqlite:///")
                   for line in lines), out
        trial = w.study().trials[number]
        assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == f"interrupted by {name}"
        run = trial_runs()[number][0]
        assert run.info.status == "KILLED" and run.data.tags[FAIL_REASON] == f"interrupted by {name}"
        assert run.data.tags["optuna.trial_state"] == "FAIL"
        assert MlflowClient().get_run(parent_id).info.status == "KILLED"

    study = w.study()
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"] and study.user_attrs[names.PARENT_RUN] == parent_id
    assert sorted(trial_runs()) == [0, 1] and all(len(rs) == 1 for rs in trial_runs().values())


def test_a_worker_starting_on_a_journal_study_recovers_trials_of_dead_processes(tmp_path, settings, digits,
                                                                              space_file):
    s = settings.replace(storage=f"journal:///{tmp_path}/study.journal", search_space=space_file, n_trials=1,
                         epochs=1)
    space = load_space(s.search_space)
    study = open_study(s, space)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = study.ask()
    space.sample(orphan)
    orphan.set_user_attr("worker_host", HOST)
    orphan.set_user_attr("worker_pid", gone.pid)
    alive = study.ask()  # owned by a live process (this one): left alone
    alive.set_user_attr("worker_host", HOST)
    alive.set_user_attr("worker_pid", os.getppid())

    run_study("search", s, digits, space)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "RUNNING", "COMPLETE"]
    assert study.trials[2].system_attrs["failed_trial"] == 0 and study.trials[2].params == study.trials[0].params


def test_a_search_runs_on_mysql_and_the_password_stays_out_of_mlflow(tmp_path, settings, digits, space_file,
                                                                     mysql, capsys):
    url, password = mysql
    s = settings.replace(storage=url, search_space=space_file, n_trials=3, epochs=2, pruner="median")
    space = load_space(space_file)
    study = open_study(s, space)
    run_study("search", s, digits, space)

    study = optuna.load_study(study_name=s.study, storage=make_storage(url))
    assert counted_trials(study) == 3 and study.best_trial.state.name == "COMPLETE"
    assert all(len(t.intermediate_values) >= 1 for t in study.trials), "every epoch was reported"
    parent = MlflowClient().get_run(study.user_attrs[names.PARENT_RUN])
    assert parent.data.params["storage"] == url.replace(password, "***")
    assert password.encode() not in (tmp_path / "mlflow.db").read_bytes()
    assert password not in capsys.readouterr().out


def test_one_worker_is_reproducible_and_trial_numbers_get_different_draws(tmp_path, settings, space_file):
    s = settings.replace(search_space=space_file)
    space = load_space(space_file)
    draws = []
    for name in ("a", "b"):
        study = open_study(s.replace(study_name=name), space)
        draws.append([space.sample(study.ask()) for _ in range(6)])
    assert draws[0] == draws[1], "same seed, same trial numbers: same configurations"
    assert len({tuple(sorted(p.items())) for p in draws[0]}) == 6, "different trial numbers: different draws"


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(dataset="cifar10"), "was made with dataset='digits', not 'cifar10'"),
        (dict(direction="minimize"), "was made with direction='maximize', not 'minimize'"),
        (dict(metric="val_loss"), "was made with metric='val_accuracy', not 'val_loss'"),
        (dict(search_space="other"), "was made with search_space="),
    ],
)
def test_reusing_a_study_with_another_identity_is_a_one_line_error(tmp_path, settings, space_file, change, fragment):
    settings = settings.replace(search_space=space_file)
    space = load_space(space_file)
    study = open_study(settings, space)
    study.ask()
    if "search_space" in change:
        other = tmp_path / "other.yaml"
        other.write_text(TINY_SPACE.replace("[4, 8, 16]", "[4, 8]"))
        change = dict(search_space=str(other))
    changed = settings.replace(**change)
    with pytest.raises(PipelineError) as error:
        open_study(changed, load_space(changed.search_space))
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert len(open_study(settings, space).trials) == 1, "the study is left as it was"


def test_storage_urls_read_variables_from_the_environment_and_hide_passwords(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_DIR", str(tmp_path))
    make_storage("sqlite:///${PIPELINE_TEST_DIR}/from-env.db")
    assert (tmp_path / "from-env.db").is_file()
    with pytest.raises(PipelineError) as error:
        make_storage("postgresql://someone:hunter2secret@127.0.0.1:1/none")
    assert "someone:***@" in str(error.value) and "hunter2secret" not in str(error.value)


@pytest.mark.drill
@pytest.mark.slow
def test_a_worker_killed_after_the_last_trial_was_handed_out_leaves_nothing_running(sqlite_workers, capsys):
    """Worker A takes trial 0 and is SIGKILLed; worker B then spends the rest of the budget
    (trials 1 and 2) before A's heartbeat is stale. B waits for it to go stale (bounded by the
    grace period), fails it and closes its MLflow run: once B exits no trial and no run is RUNNING."""
    workers = sqlite_workers
    doomed = workers.start("--n-trials", "2", "--grace-period", "8", *SLOW)
    victim = wait_until_training(proc=doomed)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    code, out = workers.here(capsys, "--n-trials", "2", "--epochs", "1", "--grace-period", "8")
    assert code == 0, out
    study = workers.study()
    assert counted_trials(study) == 2
    assert study.trials[0].state.name == "FAIL", out
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert "failed and requeued dead trials [0]" in out
    runs = runs_of("dist")
    assert not [r for r in runs if r.info.status == "RUNNING"], "no MLflow run left RUNNING, the parent's included"
    dead = next(r for r in runs if r.info.run_id == victim.info.run_id)
    assert dead.info.status == "FAILED" and "worker died" in dead.data.tags[FAIL_REASON]

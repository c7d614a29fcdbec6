"""The many-machines stack on one machine: PostgreSQL databases, an MLflow server, workers.

    python deploy/stack.py up      [--dir .stack] [--port 5000]    # databases + MLflow server
    source .stack/env                                              # MLFLOW_TRACKING_URI, PGPASSWORD, OPTUNA_STORAGE
    python deploy/stack.py workers 3 [--dir .stack] -- --study-name s --n-trials 20 ...
    python deploy/stack.py restart [--dir .stack] [--outage 20]    # stop the MLflow server, wait, start it
    python deploy/stack.py down    [--dir .stack] [--drop]         # stop what it started (--drop: the databases too)

`up` creates a fresh role with a random password and two databases it owns on the PostgreSQL
server `--admin` reaches (default: user postgres at 127.0.0.1:5432): `<role>_optuna` for the
study and `<role>_mlflow` for the MLflow server's backend store. With `--storage URL
--backend-store URL` it uses existing databases instead (`$VAR`s are read from the
environment). It then starts `mlflow server` on that backend store with
`--serve-artifacts --artifacts-destination <dir>/artifacts`, so clients upload and download
artifacts over HTTP and never touch the folder, waits until `/health` answers and writes
`<dir>/env` (mode 0600): the tracking URL, the password as PGPASSWORD, and the storage URL
with the literal `$PGPASSWORD` that the pipeline expands. The password is never on a
command line: the MLflow server reads it from PGPASSWORD too.

`workers N` runs N `python -m pipeline search` processes (the arguments after `--`, plus
`--storage` unless given) whose environment holds nothing of this machine but PATH, HOME
and the project on PYTHONPATH: only the two URLs and the password, as a worker on another
machine would. It waits
for them (output in `<dir>/worker-<pid>.log`), Ctrl-C/SIGTERM stops them, and it exits
with the first non-zero exit code. `down` stops the MLflow server and any worker still
running (workers first, so that they end their runs: SIGTERM, then SIGKILL after `--wait`
seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
HEALTH_WAIT = 120  # seconds the MLflow server may take to answer /health (a fresh store migrates first)
KEPT = ("PATH", "HOME", "LANG", "TMPDIR")  # what a worker inherits from this machine's environment


def fail(message: str) -> None:
    sys.exit(f"stack: {message}")


def split_password(url: str) -> tuple[str, str]:
    """postgresql://u:pw@h/db -> (postgresql://u@h/db, pw), after expanding `$VAR`s."""
    parts = urlsplit(os.path.expandvars(url))
    netloc = parts.netloc.replace(f":{parts.password}@", "@") if parts.password else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc)), parts.password or ""


def with_password_variable(url: str) -> str:
    """postgresql://u@h/db -> postgresql://u:$PGPASSWORD@h/db (what the pipeline expands)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.replace("@", ":$PGPASSWORD@", 1)))


def create_databases(admin: str) -> tuple[str, str, str, str]:
    """A fresh role with a random password owning two databases: (role, password, optuna URL, mlflow URL)."""
    import psycopg2

    try:
        connection = psycopg2.connect(admin, connect_timeout=5)
    except psycopg2.OperationalError as e:
        fail(f"cannot reach PostgreSQL as {admin} ({str(e).strip()})")
    connection.autocommit = True
    role, password = f"stack_{secrets.token_hex(4)}", secrets.token_urlsafe(18)
    host = urlsplit(admin).netloc.rpartition("@")[2]
    with connection.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
        for db in (f"{role}_optuna", f"{role}_mlflow"):
            cur.execute(f"CREATE DATABASE {db} OWNER {role}")
    connection.close()
    return role, password, f"postgresql://{role}@{host}/{role}_optuna", f"postgresql://{role}@{host}/{role}_mlflow"


def wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout: float = HEALTH_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            fail(f"the MLflow server exited with code {server.returncode} (`down --drop` cleans up); "
                 f"its log {log} ends:\n" + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop([server.pid], group=True)
    fail(f"the MLflow server did not answer {url}/health within {timeout:.0f} s: stopped (`down --drop` "
         f"cleans up); log: {log}")


def start_server(folder: Path, command: list[str], password: str) -> subprocess.Popen:
    """The MLflow server in its own session: it outlives `up`, and `down` stops its whole group.
    MLflow's job runner (six huey consumer processes, for GenAI jobs that training runs never
    submit) stays off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise."""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
           "PGPASSWORD": password}
    with open(folder / "mlflow-server.log", "a") as out:
        return subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)


def restart(args) -> None:
    """Stop the MLflow server, wait `--outage` seconds, start it again (a drill, an upgrade)."""
    folder = Path(args.dir).resolve()
    state = read_state(folder)
    stop([state["server_pid"]], args.wait, group=True)
    print(f"MLflow server stopped; starting it again in {args.outage:g} s", flush=True)
    time.sleep(args.outage)
    server = start_server(folder, state["server_command"], read_env(folder)["PGPASSWORD"])
    (folder / "stack.json").write_text(json.dumps({**state, "server_pid": server.pid}, indent=2))
    wait_for_health(state["tracking_uri"], server, folder / "mlflow-server.log")
    print(f"MLflow server answers again at {state['tracking_uri']}", flush=True)


def up(args) -> None:
    folder = Path(args.dir).resolve()
    state_file = folder / "stack.json"
    if state_file.exists():
        fail(f"{state_file} exists: a stack runs there (`down` first, or another --dir)")
    folder.mkdir(parents=True, exist_ok=True)
    if bool(args.storage) != bool(args.backend_store):
        fail("--storage and --backend-store go together")
    if args.storage:
        role = None
        storage, password = split_password(args.storage)
        backend, backend_password = split_password(args.backend_store)
        if backend_password and backend_password != password:
            fail("--storage and --backend-store must share one password (PGPASSWORD)")
    else:
        role, password, storage, backend = create_databases(args.admin)
    name = socket.gethostname() if args.host == "0.0.0.0" else args.host
    url = f"http://{name}:{args.port}"
    log = folder / "mlflow-server.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", backend.replace("postgresql://", "postgresql+psycopg2://", 1),
               "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
               "--host", args.host, "--port", str(args.port), "--workers", str(args.server_workers)]
    if args.host == "0.0.0.0":  # MLflow answers only the Host names it is told of
        command += ["--allowed-hosts", ",".join(f"{h}:{args.port}" for h in (name, "localhost", "127.0.0.1"))]
    server = start_server(folder, command, password)
    state = {"server_pid": server.pid, "server_command": command, "tracking_uri": url,
             "storage": with_password_variable(storage), "role": role, "admin": args.admin if role else None,
             "databases": [storage, backend] if role else []}
    state_file.write_text(json.dumps(state, indent=2))
    wait_for_health(url, server, log)
    env_file = folder / "env"
    env_file.touch(mode=0o600)
    env_file.write_text(f"export MLFLOW_TRACKING_URI={url}\nexport PGPASSWORD={shlex.quote(password)}\n"
                        f"export OPTUNA_STORAGE='{state['storage']}'\n")
    print(f"MLflow server: {url} (artifacts proxied from {folder / 'artifacts'}; log {log})")
    print(f"Optuna storage: {state['storage']}")
    print(f"environment of workers and refit: source {env_file}")


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / "stack.json").read_text())
    except FileNotFoundError:
        fail(f"no stack in {folder} (run `up` first)")


def read_env(folder: Path) -> dict:
    """The variables `<dir>/env` exports."""
    env = {}
    for line in (folder / "env").read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0]
    return env


def workers(args) -> int:
    folder = Path(args.dir).resolve()
    state = read_state(folder)
    env = {k: os.environ[k] for k in KEPT if k in os.environ} | {"PYTHONPATH": str(ROOT)}
    env.update({k: v for k, v in read_env(folder).items() if k != "OPTUNA_STORAGE"})
    extra = args.pipeline_args
    if "--storage" not in {a.split("=")[0] for a in extra}:
        extra = [*extra, "--storage", state["storage"]]
    procs = []
    for _ in range(args.n):
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix="starting-", delete=False) as log:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", "search", *extra], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        os.rename(log.name, folder / f"worker-{proc.pid}.log")  # named once the pid is known
        procs.append(proc)
        print(f"worker {proc.pid}: log {folder / f'worker-{proc.pid}.log'}", flush=True)

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for proc in procs:
        codes.append(proc.wait())
        print(f"worker {proc.pid}: exit code {codes[-1]}", flush=True)
    return next((c if c > 0 else 128 - c for c in codes if c), 0)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent (`up` has left) to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def stop(pids: list[int], wait: float = 10, group: bool = False) -> None:
    """SIGTERM each process (`group`: each process group), SIGKILL what is left after `wait` seconds."""
    send = os.killpg if group else os.kill
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                send(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


def _worker_pids(folder: Path) -> list[int]:
    """Workers started from this folder that still run (their command line names the pipeline)."""
    pids = []
    for log in folder.glob("worker-*.log"):
        pid = int(log.stem.removeprefix("worker-"))
        try:
            if b"pipeline" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def down(args) -> None:
    folder = Path(args.dir).resolve()
    state = read_state(folder)
    stop(_worker_pids(folder), args.wait)  # first: they end their runs on the server
    stop([state["server_pid"]], args.wait, group=True)
    if args.drop and state["role"]:
        import psycopg2

        connection = psycopg2.connect(state["admin"], connect_timeout=5)
        connection.autocommit = True
        with connection.cursor() as cur:
            for url in state["databases"]:
                cur.execute(f"DROP DATABASE IF EXISTS {urlsplit(url).path.lstrip('/')} WITH (FORCE)")
            cur.execute(f"DROP ROLE IF EXISTS {state['role']}")
        connection.close()
    (folder / "stack.json").unlink()
    (folder / "env").unlink(missing_ok=True)
    print(f"stack in {folder}: stopped" + (", databases and role dropped" if args.drop and state["role"] else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="create the databases, start the MLflow server")
    p.add_argument("--admin", default=ADMIN, help=f"PostgreSQL URL allowed to create roles (default: {ADMIN})")
    p.add_argument("--storage", default="", help="an existing Optuna database instead (postgresql://...)")
    p.add_argument("--backend-store", default="", help="an existing MLflow database instead (postgresql://...)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the MLflow server's address (0.0.0.0: for other machines, as this host's name)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--server-workers", type=int, default=1, help="the MLflow server's worker processes")
    p = sub.add_parser("workers", help="run N search workers until they end")
    p.add_argument("n", type=int)
    p.epilog = "after `--`: options of `python -m pipeline search`"
    p = sub.add_parser("restart", help="stop the MLflow server, wait, start it again")
    p.add_argument("--outage", type=float, default=20, help="seconds the server stays down")
    p.add_argument("--wait", type=float, default=10, help="seconds between SIGTERM and SIGKILL")
    p = sub.add_parser("down", help="stop the MLflow server and workers")
    p.add_argument("--drop", action="store_true", help="also drop the databases and role `up` created")
    p.add_argument("--wait", type=float, default=10, help="seconds between SIGTERM and SIGKILL")
    for p in sub.choices.values():
        p.add_argument("--dir", default=".stack", help="the stack's folder: state, env, logs, artifacts")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.pipeline_args = argv[cut + 1:]
    return {"up": up, "workers": workers, "restart": restart, "down": down}[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())

"""Load on the many-machines stack: W search workers with near-zero-cost trials against one
PostgreSQL study and one `mlflow server` (deploy/stack.py), for M minutes.

    python bench/load.py --workers 8 --minutes 3
    python bench/load.py --workers 32 --minutes 3 --backend jax   # a JAX worker holds less memory

`deploy/stack.py up` makes a fresh role, databases and server in a temp folder; W workers
(`deploy/stack.py workers`: only the two URLs and PGPASSWORD) run `search` on digits with a
one-conv model, one epoch, no pruning, a study-wide deadline of M minutes after which no
trial starts; then `down --drop`. Trials per minute count complete trials started in the
window. Bookkeeping is what a trial costs besides training: per trial, Optuna's start to
complete minus `fit_seconds` (building and fitting; MLflow run open and close, dataset and
metric logging, heartbeat and tell are the rest), and per worker the gap from one trial's
completion to its next trial's start (tell, ask, sampling). Errors are counted by kind in the
worker logs; PostgreSQL connections held by the stack's role are sampled every second.

Last line: `name=value` pairs: `workers minutes backend trials trials_per_min bookkeeping_p50_s
bookkeeping_p95_s gap_p50_s gap_p95_s pg_connections_max errors_<kind>... failed_workers`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common import ROOT, result_line

import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT / "deploy"))
import stack as stack_module  # noqa: E402

SPACE = """description: load test, a one-conv model
depth: 1
first_block: {filters: 4, kernel_size: 3, pool_size: 2}
dense: {units: 8}
training: {optimizer: adam, learning_rate: 0.001, batch_size: 256}
"""
ERRORS = {  # kind: what marks it in a worker's log
    "database_locked": r"database is locked",
    "connection": r"[Cc]onnection (reset|refused)|server closed the connection|OperationalError",
    "http_5xx": r"(status code|HTTP|response code)[^\n]{0,40}\b5\d\d\b",
    "retries": r"[Rr]etrying|retry",
    "tracebacks": r"^Traceback",
}


def stack(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "stack.py"), *args], check=check, **kwargs)


def pg_connections(role: str, stop: threading.Event, seen: list) -> None:
    import psycopg2

    conn = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        while not stop.wait(1.0):
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,))
            seen.append(cur.fetchone()[0])
    conn.close()


def percentile(values, q) -> float:
    return round(float(np.percentile(values, q)), 3) if len(values) else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--backend", default="tensorflow", help="the workers' Keras backend (jax: less memory each)")
    args = ap.parse_args(argv)
    import optuna

    from pipeline import names
    from pipeline.study import make_storage

    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        folder = Path(tmp)
        (folder / "space.yaml").write_text(SPACE)
        stack("up", "--dir", str(folder), "--port", str(_free_port()), stdout=subprocess.DEVNULL)
        state = json.loads((folder / "stack.json").read_text())
        seen, stop = [], threading.Event()
        sampler = threading.Thread(target=pg_connections, args=(state["role"], stop, seen), daemon=True)
        sampler.start()
        seconds = int(args.minutes * 60)
        try:
            done = stack("workers", str(args.workers), "--dir", str(folder), "--", "--dataset", "digits",
                         "--search-space", str(folder / "space.yaml"), "--study-name", "load", "--n-trials", "100000",
                         "--epochs", "1", "--pruner", "none", "--timeout", str(seconds), "--experiment-name", "load",
                         "--heartbeat-interval", "5", "--grace-period", "60", "--backend", args.backend,
                         check=False, stdout=subprocess.DEVNULL)
            stop.set()
            os.environ["PGPASSWORD"] = stack_module.read_env(folder)["PGPASSWORD"]
            study = optuna.load_study(study_name="load", storage=make_storage(state["storage"]))
            trials = study.get_trials(deepcopy=False)
            logs = "\n".join(p.read_text(errors="replace") for p in folder.glob("worker-*.log"))
        finally:
            stop.set()
            stack("down", "--dir", str(folder), "--drop", stdout=subprocess.DEVNULL)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    first = min(t.datetime_start for t in trials)
    bookkeeping = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs[names.FIT_SECONDS]
                   for t in complete if names.FIT_SECONDS in t.user_attrs]
    gaps, by_worker = [], {}
    for t in sorted(complete, key=lambda t: t.datetime_start):
        pid = t.user_attrs.get(names.WORKER_PID)
        if pid in by_worker:
            gaps.append((t.datetime_start - by_worker[pid]).total_seconds())
        by_worker[pid] = t.datetime_complete
    window = [t for t in complete if (t.datetime_start - first).total_seconds() <= seconds]
    out = {"workers": args.workers, "minutes": args.minutes, "backend": args.backend, "trials": len(complete),
           "trials_per_min": round(len(window) / args.minutes, 1),
           "bookkeeping_p50_s": percentile(bookkeeping, 50), "bookkeeping_p95_s": percentile(bookkeeping, 95),
           "gap_p50_s": percentile(gaps, 50), "gap_p95_s": percentile(gaps, 95),
           "pg_connections_max": max(seen or [0]),
           **{f"errors_{kind}": len(re.findall(pattern, logs, re.M)) for kind, pattern in ERRORS.items()},
           "failed_workers": done.returncode != 0}
    print(result_line(out))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()

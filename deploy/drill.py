"""Fault drill on the many-machines stack: the tracking server and PostgreSQL restart under
running workers, then PostgreSQL stays away longer than a worker waits.

    python deploy/drill.py [--workers 2] [--outage 10] [--long-outage 60]

Needs the PostgreSQL server at 127.0.0.1:5432 (user postgres) to be a local cluster this
user may stop and start (`pg_ctlcluster`; `--pg-stop` / `--pg-start` give other commands).
It stands a fresh stack up (`deploy/stack.py up`: role, databases, `mlflow server`) and runs
`deploy/stack.py workers` on digits with a one-conv space:

1. short outages: W workers search for `--minutes`; after a while the MLflow server is
   stopped for `--outage` seconds and started again (`stack.py restart`), later PostgreSQL
   (`pg_ctlcluster ... stop -m fast`, wait, start). Expected: every worker exits 0, no trial
   fails, one FINISHED MLflow run per trial.
2. a long outage: W workers on a second study; PostgreSQL stops for `--long-outage` seconds,
   longer than a worker waits (grace_period - heartbeat_interval, 20 s by default). Expected:
   each worker fails its trial and exits 75 with a one-line error; once PostgreSQL is back, one
   worker resumes the study: the abandoned trials turn FAIL and are retried, no trial and no
   MLflow run is left RUNNING.

Prints what happened per phase (exit codes, trials by state, MLflow runs by status, the
longest gap between two trial completions, retry lines in the worker logs, whether the
password appears in any log) and a last `name=value` line. The stack is dropped at the end.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack  # noqa: E402

sys.path.insert(0, str(stack.ROOT))

SPACE = """\
description: one small conv net (the drill's trials take a second or two)
depth: 1
first_block: {filters: 8, kernel_size: 3, pool_size: 2}
dense: {units: 32}
"""


def local_cluster() -> list[str]:
    """`pg_ctlcluster` arguments of the cluster on port 5432 (from `pg_lsclusters`)."""
    for line in subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True).stdout.splitlines():
        version, cluster, port, *_ = line.split()
        if port == "5432":
            return ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster]
    sys.exit("drill: no local PostgreSQL cluster on port 5432 (give --pg-stop and --pg-start)")


def postgres_outage(stop: list[str], start: list[str], seconds: float, events: list) -> None:
    events.append((time.time(), f"PostgreSQL stopped for {seconds:g} s"))
    subprocess.run(stop, check=True, capture_output=True)
    time.sleep(seconds)
    subprocess.run(start, check=True, capture_output=True)
    events.append((time.time(), "PostgreSQL started"))


def at(delay: float, action, *args) -> threading.Thread:
    def run():
        time.sleep(delay)
        action(*args)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_workers(folder: Path, n: int, study: str, space: Path, minutes: float, trials: int = 100_000) -> list[int]:
    """`stack.py workers n` on `study` until `minutes` pass; the exit code of each worker."""
    out = subprocess.run(
        [sys.executable, str(stack.ROOT / "deploy" / "stack.py"), "workers", str(n), "--dir", str(folder), "--",
         "--dataset", "digits", "--search-space", str(space), "--study-name", study, "--n-trials", str(trials),
         "--epochs", "2", "--pruner", "none", "--threads", "1", "--experiment-name", "drill",
         "--timeout", str(round(minutes * 60))],
        capture_output=True, text=True)
    return [int(code) for code in re.findall(r"exit code (-?\d+)", out.stdout)]


def study_figures(storage, study: str, client, experiment_id: str) -> dict:
    trials = storage.get_all_trials(storage.get_study_id_from_name(study))
    done = sorted(t.datetime_complete.timestamp() for t in trials if t.datetime_complete)
    runs = client.search_runs([experiment_id], f"tags.`optuna.study_name` = '{study}'", max_results=5000)
    numbers = [n for r in runs if (n := r.data.tags.get("optuna.trial_number")) is not None]
    return {
        "trials": dict(collections.Counter(t.state.name for t in trials)),
        "runs": dict(collections.Counter(r.info.status for r in runs)),
        "runs_per_trial_number": max(collections.Counter(numbers).values(), default=0),
        "trial_numbers_without_run": len({t.number for t in trials} - {int(n) for n in numbers}),
        "longest_gap_s": round(max((b - a for a, b in zip(done, done[1:])), default=0.0), 1),
    }


def log_lines(folder: Path, since: set[str]) -> tuple[dict, set[str]]:
    """Counts of retry and error lines in the worker logs not in `since`."""
    logs = {p.name for p in folder.glob("worker-*.log")} - since
    kinds = {"study database retries": "the study database: ", "heartbeats skipped": "the study database: ",
             "tracking server retries": "tracking server: ", "one-line errors": "error: ", "tracebacks": "Traceback"}
    counts = dict.fromkeys(kinds, 0)
    for name in logs:
        for line in (folder / name).read_text(errors="replace").splitlines():
            for kind, start in kinds.items():
                skipped = line.endswith("heartbeat skipped")
                counts[kind] += line.startswith(start) and skipped == (kind == "heartbeats skipped")
    return counts, since | logs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=3, help="length of the short-outage phase")
    ap.add_argument("--outage", type=float, default=10, help="seconds the short outages last")
    ap.add_argument("--long-outage", type=float, default=60, help="seconds PostgreSQL stays away in phase 2")
    ap.add_argument("--pg-stop", default="", help="command that stops PostgreSQL (default: pg_ctlcluster ... stop)")
    ap.add_argument("--pg-start", default="", help="command that starts it again")
    ap.add_argument("--port", type=int, default=5077)
    ap.add_argument("--logs", default="", help="copy the worker and server logs into this folder")
    args = ap.parse_args(argv)
    cluster = [] if args.pg_stop and args.pg_start else local_cluster()
    pg_stop = args.pg_stop.split() or [*cluster, "stop", "-m", "fast"]
    pg_start = args.pg_start.split() or [*cluster, "start"]

    from mlflow.tracking import MlflowClient

    from pipeline.study import make_storage

    out, events = {}, []
    with tempfile.TemporaryDirectory(prefix="drill-") as tmp:
        folder, space = Path(tmp) / "stack", Path(tmp) / "space.yaml"
        space.write_text(SPACE)
        subprocess.run([sys.executable, str(stack.ROOT / "deploy" / "stack.py"), "up", "--dir", str(folder),
                        "--port", str(args.port)], check=True, capture_output=True)
        env = stack.read_env(folder)
        password = env["PGPASSWORD"]
        os.environ["PGPASSWORD"] = password
        try:
            storage = make_storage(stack.read_state(folder)["storage"])
            client = MlflowClient(env["MLFLOW_TRACKING_URI"])
            seen: set[str] = set()

            # 1. short outages of each server while the workers search
            start = time.time()
            restart = [sys.executable, str(stack.ROOT / "deploy" / "stack.py"), "restart", "--dir", str(folder),
                       "--outage", str(args.outage)]
            phase = args.minutes * 60
            at(phase * 0.25, lambda: (events.append((time.time(), f"MLflow server stopped for {args.outage:g} s")),
                                      subprocess.run(restart, check=True, capture_output=True),
                                      events.append((time.time(), "MLflow server answers again"))))
            at(phase * 0.6, postgres_outage, pg_stop, pg_start, args.outage, events)
            codes = run_workers(folder, args.workers, "drill-short", space, args.minutes)
            experiment = client.get_experiment_by_name("drill").experiment_id
            figures = study_figures(storage, "drill-short", client, experiment)
            lines, seen = log_lines(folder, seen)
            out["short"] = {"exit_codes": codes, "wall_s": round(time.time() - start), **figures, **lines}

            # 2. PostgreSQL away for longer than a worker waits, then one worker resumes
            start = time.time()
            at(30, postgres_outage, pg_stop, pg_start, args.long_outage, events)
            codes = run_workers(folder, args.workers, "drill-long", space, 3)
            ended = time.time()
            while not any("PostgreSQL started" in e for _, e in events[-1:]):
                time.sleep(1)
            lines, seen = log_lines(folder, seen)
            before = study_figures(storage, "drill-long", client, experiment)
            counted = sum(before["trials"].get(s, 0) for s in ("COMPLETE", "PRUNED"))
            resume = run_workers(folder, 1, "drill-long", space, 10, trials=counted + 2)
            after = study_figures(storage, "drill-long", client, experiment)
            out["long"] = {"exit_codes": codes, "workers_ended_after_s": round(ended - start - 30),
                           "trials_before_resume": before["trials"], "runs_before_resume": before["runs"],
                           "resume_exit_code": resume, **after, **lines}
            texts = [p.read_text(errors="replace") for p in folder.glob("*.log")]
            out["password_in_logs"] = any(password in t for t in texts)
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                for log in folder.glob("*.log"):
                    shutil.copy(log, args.logs)
        finally:
            subprocess.run(pg_start, capture_output=True)  # whatever happened, PostgreSQL runs again
            subprocess.run([sys.executable, str(stack.ROOT / "deploy" / "stack.py"), "down", "--dir", str(folder),
                            "--drop"], capture_output=True)

    t0 = min(t for t, _ in events)
    for t, what in events:
        print(f"+{t - t0:6.1f} s  {what}")
    for phase in ("short", "long"):
        print(f"{phase}: " + ", ".join(f"{k} {v}" for k, v in out[phase].items() if not k.startswith("_")))
    print(f"password in any log: {out['password_in_logs']}")
    short, long_ = out["short"], out["long"]
    print(" ".join(f"{k}={v}" for k, v in {
        "short_exit_ok": all(c == 0 for c in short["exit_codes"]),
        "short_failed_trials": short["trials"].get("FAIL", 0),
        "short_longest_gap_s": short["longest_gap_s"],
        "long_exit_codes": ",".join(map(str, long_["exit_codes"])),
        "long_resume_ok": long_["resume_exit_code"] == [0],
        "long_running_left": long_["trials"].get("RUNNING", 0) + long_["runs"].get("RUNNING", 0),
        "password_in_logs": out["password_in_logs"]}.items()))
    return out


if __name__ == "__main__":
    main()

"""`workers=N`: N worker processes on this machine searching one study, the cores split between them.

    run_workers(study, settings, until)   # blocks until every worker has exited

One TensorFlow process keeps only ~1.2 of 2 cores busy at CNN batch sizes (small ops do not split
over threads); N processes of cores/N threads each train more evaluations an hour (issue 22:
1.66x on 2 cores). Each worker is `python -m pipeline search` on the same study and storage with
`workers=1`, `threads` = cores // N (or the `threads` given, per worker), no warm start (the
caller enqueued it) and, with `until`, the time budget that ends then (its search ends its
reserve earlier: the worker's report and exit fit before `until`). A worker's
output goes to `worker-logs/<study>/worker-<i>.log`; this process shows the study's progress bar
meanwhile. Ctrl-C or SIGTERM here is passed on to the workers (each fails its running trial, as
a signalled worker does) and waited for; so is any error that ends this process while they run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from pipeline import process
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.terminal import progress_bar

POLL = 2.0  # seconds between looks at the study while the workers run
LOGS = Path("worker-logs")


def worker_settings(settings: Settings, until: float | None, now: float | None = None) -> Settings:
    """What each worker runs: one process (no cluster of its own), its share of the cores, the budget
    that ends at `until`."""
    now = time.time() if now is None else now
    threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)
    # a worker's budget ends at `until`: its search ends its reserve earlier, which its report and
    # exit take, so that this process's refit starts on time
    budget = max(1, int(until - now)) if until is not None else 0
    return settings.replace(workers=1, threads=threads, warm_start="", only="", time_budget=budget, cluster="")


def run_workers(study: optuna.Study, settings: Settings, until: float | None) -> list[int]:
    """Start `settings.workers` search workers on `study`, wait for them; returns their exit codes."""
    child = worker_settings(settings, until)
    folder = LOGS / study.study_name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"workers: {settings.workers} processes x {child.threads} thread(s) on study {study.study_name!r}; "
          f"logs in {folder}/", flush=True)
    env = process.worker_environment()
    procs, logs = [], []
    for i in range(settings.workers):
        log = folder / f"worker-{i}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", *child.argv("search")],
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        logs.append(log)
    follow(study, settings, until, lambda: any(p.poll() is None for p in procs),
           lambda e: process.stop(procs, _passed_on(e)))
    codes = [p.returncode for p in procs]
    for i, code in enumerate(codes):
        if code:
            tail = logs[i].read_text().strip().splitlines()[-1:] or ["(no output)"]
            print(f"worker {i} exited with code {code}: {tail[0]} (log: {logs[i]})", file=sys.stderr)
    if all(codes):
        raise PipelineError(f"workers={settings.workers}: every worker failed (logs in {folder}/)")
    return codes


def follow(study: optuna.Study, settings: Settings, until: float | None, running, stop) -> None:
    """Show the study's progress bar while `running()`; where Ctrl-C, SIGTERM or this process failing
    (its output closed) ends the wait, `stop(exception)` first, so that no worker is left behind."""
    try:
        with progress_bar(study, settings, until) as bar:
            while running():
                time.sleep(POLL)
                bar(study, None)
    except BaseException as e:
        stop(e)
        raise


def _passed_on(e: BaseException) -> int:
    """The signal the workers get where `e` ended the wait: SIGINT for Ctrl-C, else SIGTERM."""
    return signal.SIGINT if isinstance(e, KeyboardInterrupt) and str(e) != "SIGTERM" else signal.SIGTERM

"""What one task of `cluster=ADDRESS` runs on a Dask worker (pipeline.cluster says why a process):

    run_search_worker(argv, until, env, stop_event)   # submitted by pipeline.cluster.submit

`python -m pipeline <argv>` (argv: `search` and its options) as a child of the Dask worker, with its Python and the
`pipeline` package it imported this module from; returns where it ran, its exit code and its
output. At module level this imports only the standard library and pipeline.process: the
scheduler imports it too, to unpickle the task.

- The child's time budget ends at `until` (epoch seconds), counted when the task starts, not when
  it was submitted: a task may wait for a free worker.
- Its environment is the Dask worker's, with `env` (the submitting process's tracking URI and
  the variables its storage names) on top, and the Dask worker's address, which it records on
  each trial it runs (user attr `dask_worker`).
- Every POLL s the task looks whether the submitting process asked for a stop (the Dask Event
  named `stop_event`) or Dask cancelled the task (`client.cancel`, or the submitting client is
  gone); then the child gets SIGTERM, fails its running trial and exits, or is killed after
  STOP_WAIT s (pipeline.process.stop).
- On Linux the child dies by SIGKILL with the Dask worker (PR_SET_PDEATHSIG): a worker killed or
  lost leaves a trial whose heartbeat stops, as a lost machine does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from pipeline import process
from pipeline.names import DASK_WORKER_ENV

POLL = 2.0  # seconds between looks for a stop
OUTPUT_CHARS = 200_000  # the end of the child's output that comes back to the submitting process
PR_SET_PDEATHSIG = 1  # prctl(2)
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def run_search_worker(argv: list[str], until: float | None, env: dict[str, str], stop_event: str) -> dict:
    """Run the search worker `python -m pipeline <argv>` until it exits or is stopped."""
    from distributed import Event, get_worker

    worker = get_worker()
    key = worker.get_current_task()
    budget = ["--time-budget", str(max(1, int(until - time.time())))] if until is not None else []
    child_env = process.worker_environment({**os.environ, **env, DASK_WORKER_ENV: worker.address})
    child_env.pop("MLFLOW_RUN_ID", None)  # a run of the Dask worker's own environment is not this study's
    stop = Event(stop_event)
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv, *budget], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
                                preexec_fn=_dies_with(os.getpid()) if _prctl else None)
        while not _ended(proc):
            if _asked_to_stop(stop) or _cancelled(worker, key):
                process.stop([proc], signal.SIGTERM)
        out.seek(0)
        output = out.read()[-OUTPUT_CHARS:]
    return {"worker": worker.address, "host": socket.gethostname(), "pid": proc.pid, "code": proc.returncode,
            "output": output}


def _ended(proc: subprocess.Popen) -> bool:
    try:
        proc.wait(timeout=POLL)
    except subprocess.TimeoutExpired:
        return False
    return True


def _asked_to_stop(stop) -> bool:
    try:
        return stop.is_set()
    except Exception:  # the scheduler does not answer: not a stop (a cancelled task is seen locally)
        return False


def _cancelled(worker, key) -> bool:
    """Whether Dask no longer wants this task: cancelled, or released with the client that submitted it."""
    task = worker.state.tasks.get(key)
    return task is None or task.state not in ("executing", "long-running")


def _dies_with(parent: int):
    """The child's first act, before exec: SIGKILL when the thread that started it ends (the Dask
    worker's task thread, which waits for it), and an exit at once where the worker is already gone."""
    def first():
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(137)
    return first

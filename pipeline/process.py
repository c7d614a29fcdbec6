"""How a `python -m pipeline` (or `cnn-search`) process loads its libraries and ends: for speed
only, nothing it computes changes.

    sys.exit(process.run(main))   # the process entry
    process.libraries_loaded()    # once TensorFlow, Keras, MLflow and Optuna are imported
    process.stop(children, sig)   # the worker processes it started: signalled, waited for, killed at last
    process.worker_environment()  # theirs: this package's folder first on PYTHONPATH

- Loading: those libraries make millions of Python objects as they import, and the garbage
  collector walks them again and again while they do. It is off from the process's start until
  `libraries_loaded()`, which moves everything loaded so far out of its reach for good
  (`gc.freeze`) and turns it back on, before any training makes garbage.
- Ending: once every exit handler has run (MLflow's, Optuna's, the logging module's), the
  interpreter's own teardown of those libraries only frees memory the system takes back anyway:
  the process ends there (`os._exit`) with its exit code, its output flushed. Threads that are
  not daemons have been joined before exit handlers run.
- Its workers (`workers=N`, or a Dask task's one, pipeline.cluster) import this very package,
  wherever the command was started from; `stop` signals them, gives them STOP_WAIT seconds to
  fail their running trials and exit, then kills what is left.

`python bench/process_end.py` measures what they save (bench/README.md, "Default run and test suite").
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

STOP_WAIT = 60  # seconds signalled workers get to fail their trials and exit
_exit_code = 1  # where the command ends by an exception that nothing caught


def run(main) -> int:
    """`main()` as the whole process: returns its exit code, which the process ends with."""
    global _exit_code
    gc.disable()
    atexit.register(_end)  # exit handlers run last-registered first: the libraries' run before this
    try:
        _exit_code = main()
    except SystemExit as e:  # argparse's --help, say
        _exit_code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    except KeyboardInterrupt:
        _exit_code = 130
        raise
    finally:
        libraries_loaded()
    return _exit_code


def libraries_loaded() -> None:
    """Where `run` turned the collector off: freeze what is loaded and turn it back on. A no-op
    where the collector runs (a caller of `pipeline.cli.main` in its own process, as tests are)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _end() -> None:
    logging.shutdown()  # its own exit handler was registered before this one, so would run after it
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(_exit_code)


def stop(procs: list[subprocess.Popen], sig: int) -> None:
    """Send `sig` to each of `procs` still running, wait up to STOP_WAIT s for them all, kill the rest."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + STOP_WAIT
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def worker_environment(env: dict | None = None) -> dict:
    """`env` (default: this process's environment) with the folder that holds this package first
    on PYTHONPATH, for a `python -m pipeline` worker process started from here."""
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env

"""The submitting process of `cluster=ADDRESS` (pipeline.cluster): tasks in, the study's progress out.

    reach(address)                      # before any data loads: a one-line error where no scheduler answers
    run_tasks(study, settings, until)   # `workers` tasks on the cluster, the study's progress bar meanwhile

Each task gets the worker's arguments (`python -m pipeline search` on this study, as
pipeline.budget.workers.worker_settings makes them, with `threads` 1 where 0), `until` (the end of
a time budget's search, epoch seconds), the environment its worker needs from here (this
process's tracking URI, a local store by its absolute path, the variables the storage names
as $VAR, MLflow's credentials) and the name of the Event that stops it. Each task's output comes
back into `worker-logs/<study>/task-<i>.log`. Ctrl-C or SIGTERM here (or an error) sets that
Event: every task sends its worker SIGTERM, which fails its running trial (FAIL, run KILLED);
they are waited for STOP_WAIT s, then cancelled. A task whose Dask worker died is resubmitted by
the scheduler; one that ran out of workers (KilledWorker) or failed to load is a line here, and
only where every task failed is it an error.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import optuna

from pipeline.budget.workers import LOGS, POLL, follow, worker_settings
from pipeline.cluster.task import run_search_worker
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.names import mask
from pipeline.process import STOP_WAIT

CONNECT_TIMEOUT = 10  # seconds the scheduler has to answer
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def reach(address: str) -> None:
    """A one-line error where no Dask scheduler answers at `address` within CONNECT_TIMEOUT s."""
    _connect(address).close()


def _connect(address: str):
    from distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cluster={address}: no Dask scheduler answered within {CONNECT_TIMEOUT} s "
                            f"({_first_line(e)}); start one with `dask scheduler`") from None


def run_tasks(study: optuna.Study, settings: Settings, until: float | None) -> list[int | None]:
    """Submit `settings.workers` search tasks on `study` to the cluster and wait for them; returns
    each task's exit code (None where the task itself failed)."""
    child = worker_settings(settings.replace(threads=settings.threads or 1), None)  # the budget: at the task's start
    folder = LOGS / study.study_name
    folder.mkdir(parents=True, exist_ok=True)
    env = task_environment(settings.storage)
    client = _connect(settings.cluster)
    try:
        _offered(client, settings.cluster, child.threads)
        stop, token = f"pipeline-stop-{uuid.uuid4().hex}", uuid.uuid4().hex[:8]
        futures = [client.submit(run_search_worker, child.argv("search"), until, env, stop, pure=False,
                                 key=f"search-{study.study_name}-{i}-{token}", resources={"cores": child.threads})
                   for i in range(settings.workers)]
        print(f"cluster: {settings.workers} tasks x {child.threads} core(s) on {settings.cluster}, study "
              f"{study.study_name!r}; tracking {mask(env['MLFLOW_TRACKING_URI'])}; logs in {folder}/", flush=True)
        follow(study, settings, until, lambda: not all(f.done() for f in futures),
               lambda e: _stop(client, futures, stop))
        return _report(futures, folder, settings.cluster)
    finally:
        client.close()


def task_environment(storage: str) -> dict[str, str]:
    """What every task's worker gets from this process: the tracking URI (a local store by its
    absolute path), the variables `storage` names ($VAR, ${VAR}) and MLflow's credentials, where set."""
    import mlflow

    names = [*re.findall(r"\$\{?(\w+)\}?", storage), *CREDENTIALS]
    return {"MLFLOW_TRACKING_URI": absolute(mlflow.get_tracking_uri()),
            **{name: os.environ[name] for name in names if name in os.environ}}


def absolute(uri: str) -> str:
    """A tracking URI that means the same from any folder: a relative SQLite file or store folder by its absolute path."""
    parts = urlsplit(uri)
    if parts.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        return uri if path in ("", ":memory:") else f"sqlite:///{Path(path).resolve()}"
    if parts.scheme == "":
        return str(Path(uri).resolve())
    if parts.scheme == "file" and not parts.netloc and not parts.path.startswith("/"):
        return Path(parts.path).resolve().as_uri()
    return uri


def _offered(client, address: str, cores: int) -> None:
    """A line where no worker offers `cores` cores yet: the tasks wait for one (a cluster may grow)."""
    workers = client.scheduler_info()["workers"].values()
    if not any(w.get("resources", {}).get("cores", 0) >= cores for w in workers):
        print(f"cluster: no Dask worker of {address} offers cores={cores} yet; the tasks wait for one "
              f"(dask worker {address} --nthreads N --resources cores=N)", flush=True)


def _stop(client, futures, stop: str) -> None:
    """Ask every task to stop its worker (SIGTERM), wait for them, then cancel what still runs."""
    from distributed import Event

    try:
        Event(stop, client=client).set()
    except Exception:  # the scheduler is gone: so are the tasks' futures, and cancelling them stops them
        pass
    deadline = time.monotonic() + STOP_WAIT + 2 * POLL  # a task looks every POLL s, its worker gets STOP_WAIT s
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        time.sleep(0.5)
    client.cancel(futures)


def _report(futures, folder: Path, address: str) -> list[int | None]:
    """Each task's output into its log; a line for each task that failed; an error where all did."""
    codes, reasons = [], []
    for i, future in enumerate(futures):
        try:
            result = future.result()
        except Exception as e:  # KilledWorker (its workers died allowed-failures + 1 times), or it could not load
            codes.append(None)
            reasons.append(_why(e))
            print(f"task {i}: {reasons[-1]}", file=sys.stderr)
            continue
        log = folder / f"task-{i}.log"
        log.write_text(result["output"])
        codes.append(result["code"])
        if result["code"]:
            tail = result["output"].strip().splitlines()[-1:] or ["(no output)"]
            reasons.append(f"exit code {result['code']}: {tail[0]}")
            print(f"task {i} on {result['worker']} ({result['host']}) exited with code {result['code']}: {tail[0]} "
                  f"(log: {log})", file=sys.stderr)
    if all(code != 0 for code in codes):
        raise PipelineError(f"cluster={address}: every task failed, the first: {reasons[0]} (logs in {folder}/)")
    return codes


def _why(e: BaseException) -> str:
    """A task's own failure in one line; a module the cluster lacks, by name."""
    cause = e
    while cause is not None and not isinstance(cause, ImportError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return (f"the cluster cannot import {cause.name or cause}: install requirements.txt and this project on "
                "the scheduler and every worker")
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

"""Crash recovery: fail the trials whose worker is gone, queue them again, close their MLflow runs.

    python -m pipeline recover --study-name NAME --storage URL     # on demand (also in MLproject)

Every worker does the same when it starts a search and before each trial (ahead of Optuna's
own silent check, so the worker says what it failed); when it is done, and before a refit, it waits for
other workers' running trials to finish or be found dead (`settle`). How a dead worker is found:
- RDB storages (sqlite, postgresql, mysql): its trial's heartbeat is older than `grace_period`
  (Optuna's `fail_stale_trials`, which Optuna also runs before every trial);
- a journal storage has no heartbeat: each trial records its owner (`worker_host`,
  `worker_pid` user attrs), and a RUNNING trial whose owner on this host is no longer alive
  is failed. Trials owned by other hosts are left alone (a journal file is for one machine).
A failed trial is queued again with the same params (Optuna's `RetryHeartbeatStaleTrialCallback`,
up to `MAX_RETRY` times) under a new trial number, which gets its own MLflow run; the dead
trial's run ends FAILED with the tag `pipeline.fail_reason`.
"""

from __future__ import annotations

import os
import socket
import time
import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalStorage

from pipeline import names
from pipeline.config import Settings
from pipeline.study import MAX_RETRY
from pipeline.tracking import close_dead_runs

HOST = socket.gethostname()
RUNNING, FAIL = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL


def mark_owner(trial: optuna.Trial) -> None:
    """Record which process runs the trial, so a journal study can tell when it died, and on a
    cluster the Dask worker whose task started that process."""
    trial.set_user_attr(names.WORKER_HOST, HOST)
    trial.set_user_attr(names.WORKER_PID, os.getpid())
    if dask_worker := os.environ.get(names.DASK_WORKER_ENV):
        trial.set_user_attr(names.DASK_WORKER, dask_worker)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def orphaned_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials whose owner process on this host is gone."""
    def gone(trial):
        pid = trial.user_attrs.get(names.WORKER_PID)
        return trial.user_attrs.get(names.WORKER_HOST) == HOST and pid not in (None, os.getpid()) and not _alive(pid)

    return [t for t in study.get_trials(deepcopy=False, states=(RUNNING,)) if gone(t)]


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and requeue the trials of dead workers; returns the numbers failed here."""
    if not isinstance(study._storage, JournalStorage):  # RDB: by heartbeat, retried by the storage's callback
        running = {t.number for t in study.get_trials(deepcopy=False, states=(RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return [t.number for t in study.get_trials(deepcopy=False, states=(FAIL,)) if t.number in running]
    failed = []
    for trial in orphaned_trials(study):
        try:
            study.tell(trial.number, state=FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker got there first
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
        failed.append(trial.number)
    return failed


def recover(study: optuna.Study, client, experiment_id: str | None) -> tuple[list[int], list[int]]:
    """Fail and requeue dead workers' trials, then close their MLflow runs; says what it did.
    Returns (trial numbers failed, trial numbers whose run was closed)."""
    failed = fail_dead_trials(study)
    closed = close_dead_runs(client, study, experiment_id) if experiment_id else []
    if failed or closed:
        print(f"recover: study {study.study_name!r}: failed and requeued dead trials {failed}, "
              f"closed their MLflow runs {closed}")
    return failed, closed


def settle(study: optuna.Study, client, experiment_id: str | None, settings: Settings) -> list[int]:
    """When this worker is done (budget spent, deadline passed) or before a refit: while trials of
    other workers are RUNNING, wait (at most `grace_period` + a poll of up to 2 s) for each to finish or be
    found dead, failing dead ones and closing their MLflow runs (`recover`), so a worker killed
    late in a study leaves no RUNNING trial or run behind. Trials of live processes on this host
    are not waited for (their worker ends them), nor, on a journal file, trials of other hosts.
    Returns the trial numbers failed."""
    poll = min(2.0, settings.heartbeat_interval)
    failed, deadline = [], time.monotonic() + settings.grace_period + poll
    journal = isinstance(study._storage, JournalStorage)
    while True:
        failed += recover(study, client, experiment_id)[0]
        def unknown(t):  # a RUNNING trial whose worker may have died, this process's excepted
            pid, here = t.user_attrs.get(names.WORKER_PID), t.user_attrs.get(names.WORKER_HOST) == HOST
            return not (journal or (here and (pid == os.getpid() or _alive(pid))))
        waiting = [t for t in study.get_trials(deepcopy=False, states=(RUNNING,)) if unknown(t)]
        if not waiting or time.monotonic() >= deadline:
            return failed
        time.sleep(poll)

"""Riding out an outage of the study database or the tracking server.

- The study's database (PostgreSQL, MySQL, SQLite): a storage call that cannot reach it (a
  refused or dropped connection, a locked SQLite file) is retried with backoff, one line on
  stderr per retry, for `patience` seconds; then it raises `Unreachable`, a one-line error.
  A heartbeat that cannot be recorded is skipped: the next one tries again.
- The tracking server: MLflow's client retries a failed HTTP request itself (up to
  MLFLOW_HTTP_REQUEST_MAX_RETRIES times, 7 by default, with backoff: about 4 minutes) and says
  nothing while it does; `log_retries()` prints one line per retry.
"""

from __future__ import annotations

import functools
import itertools
import logging
import sys
import time

from pipeline.errors import PipelineError
from pipeline.names import mask


class Unreachable(PipelineError):
    """A server the pipeline needs did not answer within the time it waits: the running trial
    fails, the study stays resumable."""


def lost_connection(e: BaseException) -> str | None:
    """The database's own first line if `e` is a connection the database refused, dropped or
    locked (worth a retry), else None. Optuna wraps SQLAlchemy's errors in StorageInternalError."""
    import optuna
    import sqlalchemy

    if isinstance(e, optuna.exceptions.StorageInternalError):
        e = e.__cause__
    if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
            isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated):
        lines = str(getattr(e, "orig", e)).strip().splitlines() or [type(e).__name__]
        return mask(lines[0])
    return None


def server_unreachable(e: BaseException) -> bool:
    """Whether `e` is MLflow's client giving up on the tracking server after its retries."""
    import mlflow

    return isinstance(e, mlflow.exceptions.MlflowException) and "Max retries exceeded" in str(e)


def tracking_unreachable(uri: str) -> Unreachable:
    return Unreachable(f"the tracking server {mask(uri)} did not answer "
                       "(MLFLOW_HTTP_REQUEST_MAX_RETRIES sets how long a worker waits)")


def patient(method, skip: bool = False, what: str = "the study database"):
    """`method` of a storage whose `patience` attribute bounds the seconds it waits for the
    database to come back (and whose `remove_session()` drops a broken session). `skip`: one
    try, a lost connection one line and no error (a heartbeat: the next one tries again)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline = time.monotonic() + self.patience
        for attempt in itertools.count(1):
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                reason = lost_connection(e)
                if reason is None:
                    raise
                self.remove_session()
                if skip:
                    print(f"{what}: {reason}; heartbeat skipped", file=sys.stderr, flush=True)
                    return None
                wait = min(2.0 ** (attempt - 1), deadline - time.monotonic())
                if wait <= 0:
                    raise Unreachable(f"{what} did not answer for {self.patience:g} s ({reason})") from None
                print(f"{what}: {reason}; retry {attempt} in {wait:.1f} s", file=sys.stderr, flush=True)
                time.sleep(wait)

    return call


class _HttpRetryLine(logging.Filter):
    """urllib3's retry records as one line naming the tracking server's path; every other
    record of the logger dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("Retrying"):  # a refused or dropped connection
            retry, error, path = record.args
            reason = str(error).rsplit(": ", 1)[-1]
            record.msg, record.args = "tracking server: %s; retrying %s (%s tries left)", (reason, path, retry.total)
            return True
        if record.msg.startswith("Retry: "):  # an HTTP 5xx or 429 answer
            record.msg = "tracking server: an error status; retrying %s"
            return True
        return False


class _NoOutageTraceback(logging.Filter):
    """Optuna's "Trial n failed" warning without the traceback when the cause is an outage
    (the one-line error says it all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Unreachable):
            record.exc_info = None
        return True


def log_retries() -> None:
    """One stderr line per retry of MLflow's HTTP client (urllib3 logs them, to no handler);
    no traceback in Optuna's warning about a trial an outage failed."""
    optuna_logger = logging.getLogger("optuna.study._optimize")  # where a failed trial is reported
    if not any(isinstance(f, _NoOutageTraceback) for f in optuna_logger.filters):
        optuna_logger.addFilter(_NoOutageTraceback())
    logger = logging.getLogger("urllib3.connectionpool")
    if any(isinstance(f, _HttpRetryLine) for f in logger.filters):
        return
    logger.addFilter(_HttpRetryLine())
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(logging.DEBUG)  # a retry after an error status is a DEBUG record
    logger.propagate = False

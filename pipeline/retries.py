"""Riding out an outage of the study database or the tracking server.

- The study's database (PostgreSQL, MySQL, SQLite): a storage call that cannot reach it (a
  refused or dropped connection, a locked SQLite file) is retried with backoff, one line on
  stderr per retry, for `patience` seconds; then it raises `Unreachable`, a one-line error.
  A heartbeat that cannot be recorded is skipped: the next one tries again.
- The tracking server (http or https): a command first waits for it to answer at all, for
  START_PATIENCE seconds the same way (`wait_for_server`). MLflow's client then retries a
  failed HTTP request itself, by default up to 7 times with backoff (about 4 minutes) and
  120 s a request; `tracking_patience` sets it to wait about as long as for the database,
  where the user has not set MLflow's variables (`patient_tracking`), and
  `log_retries()` prints one line per retry.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import sys
import time

from pipeline.errors import PipelineError
from pipeline.names import mask


START_PATIENCE = 15  # seconds a command waits at its start for the tracking server to answer
MIN_HTTP_TIMEOUT = 10  # seconds: the least that one request to the tracking server may wait for its answer


class Unreachable(PipelineError):
    """A server the pipeline needs did not answer within the time it waits: the running trial
    fails, the study stays resumable."""


class NeverAnswered(Unreachable):
    """The tracking server did not answer at the start: nothing was touched."""


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
    return Unreachable(f"the tracking server {mask(uri)} did not answer within a worker's patience "
                       "(grace_period - heartbeat_interval s; MLFLOW_HTTP_REQUEST_MAX_RETRIES overrides)")


def retry_while_lost(call, lost, patience: float, what: str, before_retry=None, error=Unreachable):
    """`call()`, again while the error it raises is a lost connection (`lost(e)` names it, else
    None: raised as it is), with backoff (1, 2, 4, ... s) and one stderr line per retry, for
    `patience` seconds; then `error`. `before_retry()` runs before each retry."""
    deadline = time.monotonic() + patience
    for attempt in itertools.count(1):
        try:
            return call()
        except Exception as e:
            reason = lost(e)
            if reason is None:
                raise
        if before_retry:
            before_retry()
        wait = min(2.0 ** (attempt - 1), deadline - time.monotonic())
        if wait <= 0:
            raise error(f"{what} did not answer for {patience:g} s ({reason})")
        print(f"{what}: {reason}; retry {attempt} in {wait:.1f} s", file=sys.stderr, flush=True)
        time.sleep(wait)


def patient(method, skip: bool = False, what: str = "the study database"):
    """`method` of a storage whose `patience` attribute bounds the seconds it waits for the
    database to come back (and whose `remove_session()` drops a broken session). `skip`: one
    try, a lost connection one line and no error (a heartbeat: the next one tries again)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not skip:
            return retry_while_lost(lambda: method(self, *args, **kwargs), lost_connection, self.patience, what,
                                 self.remove_session)
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            reason = lost_connection(e)
            if reason is None:
                raise
        self.remove_session()
        print(f"{what}: {reason}; heartbeat skipped", file=sys.stderr, flush=True)
        return None

    return call


def wait_for_server(uri: str, patience: float = START_PATIENCE) -> None:
    """Return once the tracking server at the http(s) URL `uri` answers at all (any HTTP status
    or a TLS handshake: MLflow's client tells a wrong password, path or certificate apart later);
    a refused, dropped or unanswered connection is retried for `patience` seconds, then
    `NeverAnswered`."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    health = parts._replace(netloc=parts.netloc.rpartition("@")[2], path=parts.path.rstrip("/") + "/health").geturl()
    deadline = time.monotonic() + patience

    def probe():
        try:
            urllib.request.urlopen(health, timeout=max(1.0, deadline - time.monotonic())).close()
        except urllib.error.HTTPError:
            pass
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ssl.SSLError):
                raise

    def lost(e: Exception) -> str | None:
        if isinstance(e, (OSError, http.client.HTTPException)):  # URLError is an OSError
            return str(getattr(e, "reason", None) or e) or type(e).__name__
        return None

    retry_while_lost(probe, lost, patience, f"the tracking server {mask(uri)}", error=NeverAnswered)


def tracking_patience(patience: float) -> dict[str, str]:
    """MLflow's HTTP retry settings under which a worker waits for the tracking server about as
    long as for the study database: `patience` seconds (grace_period - heartbeat_interval, 20 by
    default; longer, and other workers could take its trial for dead).

    - MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR = 1. urllib3 sleeps factor * 2**(n - 1) s after the
      n-th failure in a row (none after the first), plus up to 1 s of jitter
      (MLFLOW_HTTP_REQUEST_BACKOFF_JITTER's default); MLflow takes an integer factor, and 1 is
      the smallest that backs off: the retries come 0, 2, 6, 14, 30, ... s after the first try.
    - MLFLOW_HTTP_REQUEST_MAX_RETRIES = the most retries R whose sleeps, 2**R - 2 s plus R s of
      jitter, fit in the patience; at least 1, at most 10 (MLflow's limit): 4 for 20 s (the
      last retry within 18 s), 1 for 2 s.
    - MLFLOW_HTTP_REQUEST_TIMEOUT = the patience, and at least MIN_HTTP_TIMEOUT s: how long one
      try waits for an answer (a refused connection fails at once; this bounds a server that
      takes the connection and says nothing).
    """
    retries = 1
    while retries < 10 and 2 ** (retries + 1) - 2 + (retries + 1) <= patience:
        retries += 1
    return {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(MIN_HTTP_TIMEOUT, math.ceil(patience)))}


@contextlib.contextmanager
def patient_tracking(patience: float):
    """`tracking_patience(patience)` in the environment, where the user set none of those
    variables, while the block runs; afterwards the environment is as it was."""
    added = {k: v for k, v in tracking_patience(patience).items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


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


_RETRY_LINES = logging.StreamHandler(sys.stderr)  # log_retries' handler


def log_retries() -> None:
    """One stderr line per retry of MLflow's HTTP client (urllib3 logs them, to no handler), on
    the stderr of the command that calls it: a process running several commands (a test
    session, a notebook) may have swapped sys.stderr, and closed the old one, in between."""
    logger = logging.getLogger("urllib3.connectionpool")
    if _RETRY_LINES not in logger.handlers:
        logger.addFilter(_HttpRetryLine())
        logger.addHandler(_RETRY_LINES)
        logger.setLevel(logging.DEBUG)  # a retry after an error status is a DEBUG record
        logger.propagate = False
    _RETRY_LINES.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed

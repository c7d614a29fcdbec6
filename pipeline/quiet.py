"""A quiet console: what the pipeline's own use of TensorFlow and MLflow would print and a
user cannot act on is kept off the console; everything else (a warning about a user's bad
setting, any error) still shows.

    quiet_console()   # once, at the start of a command, after choosing the Keras backend

- TensorFlow prints a oneDNN banner from C++ while it is imported, before its logging is
  set up (TF_CPP_MIN_LOG_LEVEL does not reach it): the import runs with the process's
  stderr captured, and every captured line but the banner's is written back.
- MLflow's progress bars for artifact transfers (a registered model is downloaded once to
  be registered) are off; MLflow's other INFO lines stay.
- Optuna's "A new study created in memory" line: the space dry run samples from such a study,
  which stores nothing and which the user never named.
- Optuna's warnings about a failed trial carry no traceback where the command ends with a
  one-line message that says it all: an interrupt (Ctrl-C, SIGTERM: both warnings dropped,
  the command says the trial is FAIL and how to resume) or a `PipelineError` (an outage's
  `Unreachable`: the warning stays, its traceback goes).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from pipeline.errors import PipelineError

BANNER = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog() is called")


def quiet_console() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow" and "tensorflow" not in sys.modules:
        _import_without_banner()
    logging.getLogger("optuna.storages._in_memory").setLevel(logging.WARNING)
    logger = logging.getLogger("optuna.study._optimize")  # where Optuna reports a failed trial
    if not any(isinstance(f, _OneLineTrialFailure) for f in logger.filters):
        logger.addFilter(_OneLineTrialFailure())


class _OneLineTrialFailure(logging.Filter):
    """Optuna logs a failed trial as two warnings: "Trial n failed with parameters: ... because
    of the following error: ..." with the traceback, then "Trial n failed with value ...".
    After an interrupt both go; after a PipelineError the first loses its traceback."""

    def __init__(self):
        super().__init__()
        self._second = None  # how the second warning of an interrupted trial starts

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, KeyboardInterrupt):
            self._second = record.getMessage().split(" failed ", 1)[0] + " failed with value "
            return False
        if self._second and record.getMessage().startswith(self._second):
            self._second = None
            return False
        if isinstance(error, PipelineError):
            record.exc_info = None
        return True


def _import_without_banner() -> None:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(b in line for b in BANNER)))
            sys.stderr.flush()

"""A quiet console: what the pipeline's own use of TensorFlow and MLflow would print and a
user cannot act on is kept off the console; everything else (a warning about a user's bad
setting, any error) still shows.

    quiet_console()   # once, at the start of a command, after choosing the Keras backend

- TensorFlow prints a oneDNN banner from C++ while it is imported, before its logging is
  set up (TF_CPP_MIN_LOG_LEVEL does not reach it): the import runs with the process's
  stderr captured, and every captured line but the banner's is written back.
- MLflow's progress bars for artifact transfers (a registered model is downloaded once to
  be registered) are off; MLflow's other INFO lines stay.
"""

from __future__ import annotations

import os
import sys
import tempfile

BANNER = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog() is called")


def quiet_console() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow" and "tensorflow" not in sys.modules:
        _import_without_banner()


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

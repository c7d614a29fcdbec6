"""Hyperparameter search for Keras CNNs with Optuna and MLflow.

Run `python -m pipeline --help` or `mlflow run .`; see README.md.
"""

import os

# MLflow's usage telemetry is off unless a user turns it on (MLFLOW_DISABLE_TELEMETRY=false):
# its background thread sets and unsets an environment variable while the main thread may be
# iterating os.environ (urllib's proxy lookup before each tracking-server request), which
# killed a worker with "KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'"; offline it only fails anyway.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

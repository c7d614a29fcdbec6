"""Names every layer shares, and the string helpers that go with them. Imports nothing.

Trial user attributes (set by the search, read by the refit, reports and recovery), study
user attributes, the metric prefixes (`train_`, `val_`, `test_`), and the masked form of a
storage URL (no password reaches a log line, a param or a tag).
"""

from __future__ import annotations

import re

# Trial user attributes
PARAMS = "params"  # the full params dict the model was built from (fixed settings included)
EPOCHS_NEEDED = "epochs_needed"  # best epoch, 1-based (median over CV folds): what the refit trains
EPOCHS_RUN = "epochs_run"  # epochs trained, all folds together
FIT_SECONDS = "fit_seconds"  # wall seconds building and fitting the model(s), all folds; the rest is bookkeeping
PARAMS_COUNT = "params_count"
LATENCY_MS = "latency_ms"
WARM_START = "warm_start"  # name of the warm-start configuration the trial was enqueued from
MLFLOW_RUN_ID = "mlflow_run_id"  # the trial's MLflow run
FAIL_REASON = "fail_reason"  # why the trial failed (Ctrl-C, SIGTERM)
WORKER_HOST, WORKER_PID = "worker_host", "worker_pid"  # the process that runs the trial
DASK_WORKER = "dask_worker"  # cluster=...: the address of the Dask worker whose task runs the trial
RUNG = "rung"  # successive halving: the rung of an evaluation (0 = sampled; absent in a study without rungs)
PROMOTED_FROM = "promoted_from"  # the trial number whose configuration this evaluation trains again, one rung up
FIDELITY_EPOCHS, FIDELITY_ROWS = "fidelity_epochs", "fidelity_rows"  # what an evaluation trains: epochs, rows
CUT = "cut"  # why a trial's training was cut short (a time budget's search share ended during it)
FIDELITY_SECONDS = "fidelity_seconds"  # equal-time rungs: the seconds an evaluation was given
FIDELITY_VAL_ROWS = "fidelity_val_rows"  # the validation images an evaluation was scored on (the noise)
CONTROL = "control"  # true on the evaluations of the space's default configuration (the control)
COST_KEY = "cost_key"  # what an evaluation's epoch cost is known by (pipeline.budget.plan.cost_key)

# The environment variable through which a cluster's task tells its search worker the Dask worker's address
DASK_WORKER_ENV = "PIPELINE_DASK_WORKER"

# Study user attributes
PARENT_RUN = "mlflow_parent_run_id"  # the study's MLflow parent run
CREATOR = "created_by"  # "host:pid" of the process that created the study
DEADLINE = "deadline"  # epoch seconds after which no trial starts
WARM_STARTED = "warm_start_enqueued"  # {name: params} of the configurations already enqueued
RUNGS = "rungs"  # successive halving: [epochs per rung] fixed by the first worker ([] = no rungs), and
ETA = "eta"  # the promotion share 1/eta
RUNG_SECONDS = "rung_seconds"  # equal-time rungs: [seconds per rung] (an evaluation's epochs follow from its cost)
COSTS = "epoch_costs"  # {cost key: [setup seconds, seconds an epoch with its validation]}, measured
DEFAULT_ENQUEUED = "default_enqueued"  # the default configuration enqueued as the first evaluation
TPE_STARTUP = "tpe_startup"  # random evaluations before TPE models a rung, as a time budget sized them

_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")


def mask(url: str) -> str:
    """Hide the password of a URL: postgresql://u:secret@h/db -> postgresql://u:***@h/db."""
    return _PASSWORD.sub(r"\1***\3", url)


def prefixed(logs: dict) -> dict:
    """Keras log names -> ours: `accuracy` -> `train_accuracy`, `val_*` unchanged."""
    return {(k if k.startswith("val_") else f"train_{k}"): float(v) for k, v in logs.items()}

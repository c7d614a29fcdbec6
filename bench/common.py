"""Helpers shared by the bench scripts: import path, quiet TensorFlow, an epoch clock,
temporary MLflow/Optuna stores, the environment of a `python -m pipeline` process, what machine
and commit a figure comes from, and the `name=value` result line."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402


class EpochClock(keras.callbacks.Callback):
    """Wall seconds of each epoch, from one epoch's start to the next one's (or the end of
    training), so every callback's end-of-epoch work (logging, pruning, validation) counts."""

    def __init__(self):
        super().__init__()
        self.fits = []  # one list of epoch seconds per fit

    def on_train_begin(self, logs=None):
        self.marks = []

    def on_epoch_begin(self, epoch, logs=None):
        self.marks.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.fits.append(list(np.diff([*self.marks, time.perf_counter()])))

    def steady(self) -> float:
        """Median epoch seconds of the last fit, leaving out its first (tracing) epoch."""
        epochs = self.fits[-1]
        return float(np.median(epochs[1:] or epochs))


@contextlib.contextmanager
def temp_stores():
    """A temp folder with an MLflow SQLite tracking store set as the current one."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ.pop("MLFLOW_RUN_ID", None)
        mlflow.set_tracking_uri(uri)
        try:
            yield Path(tmp)
        finally:
            mlflow.set_tracking_uri(old)
            if old is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old


def fixed_space(folder: Path, batch_size: int = 32) -> Path:
    """A search-space file with every setting fixed: one model, two conv blocks (32 and 64
    filters) and one 128-unit hidden layer, the tutorial's kind. Returns its path."""
    import yaml

    space = {
        "description": "one fixed model for the bench scripts",
        "depth": 2,
        "first_block": {"filters": 32, "kernel_size": 3, "pool_size": 2},
        "later_blocks": {"filters": 64, "kernel_size": 3, "pool_size": 2},
        "dense": {"units": 128, "layers": 1},
        "training": {"optimizer": "adam", "learning_rate": 0.001, "batch_size": batch_size},
    }
    path = folder / "fixed_space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def pipeline_env(folder: Path) -> dict:
    """The environment of a `python -m pipeline` process whose MLflow store is `folder`/mlflow.db
    (this checkout's package first on its path, no inherited project run, TensorFlow quiet)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def machine() -> dict:
    """Where a figure comes from: the commit (`-dirty` with uncommitted changes to pipeline/ or
    bench/), the CPU's model, family and model number (one model name covers several kinds), the
    flags that change its speed at training (AVX-512 BF16, AMX), its cores, and the load average."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info.splitlines()  # noqa: E731
                               if line.split(":", 1)[0].strip() == name), "?")
    return {"commit": git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "pipeline", "bench") else ""),
            "cpu": model, "cpu_kind": f"family {field('cpu family')}, model {field('model')}",
            "cores": len(os.sched_getaffinity(0)), "avx512_bf16": "avx512_bf16" in flags,
            "amx": bool(flags & {"amx_bf16", "amx_tile", "amx_int8"}), "load": [round(x, 2) for x in os.getloadavg()]}


def kind_folder(where: dict) -> str:
    """The records' folder name for the kind of CPU `machine()` describes: model name, family and
    model number, as amd-epyc-f25-m17."""
    family, model = (part.split()[-1] for part in where["cpu_kind"].split(","))
    return re.sub(r"[^a-z0-9]+", "-", f"{where['cpu'].lower()} f{family} m{model}").strip("-")


def result_line(values: dict) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())

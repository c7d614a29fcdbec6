"""Run settings: one dataclass, validated early, shared by the CLI and MLproject.

Every user-facing parameter is a field of `Settings`; `pipeline.cli` turns each field
into a `--name` option (dashes or underscores) and MLproject passes the same names.
Unknown or ill-typed values are rejected before any data is loaded or any run is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

PRUNERS = ("median", "hyperband", "none")


def _param(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    dataset: str = _param("digits", "digits, cifar10, a CIFAR-10 python archive/folder, or an image folder")
    search_space: str = _param("search_spaces/seed.yaml", "search-space YAML file")
    n_trials: int = _param(20, "trial budget of the whole study (all workers together)")
    timeout: int = _param(0, "stop starting trials after this many seconds (0 = no limit)")
    epochs: int = _param(10, "epoch cap of each trial")
    study_name: str = _param("", "Optuna study name (default: <dataset>-<space>)")
    storage: str = _param("sqlite:///optuna.db", "Optuna storage URL")
    seed: int = _param(42, "seed of the sampler, the splits and the weights")
    cv_folds: int = _param(1, "1 = hold-out validation; k > 1 = stratified k-fold CV")
    pruner: str = _param("median", "median, hyperband or none")
    experiment_name: str = _param("cnn-search", "MLflow experiment (ignored under `mlflow run`, which picks its own)")
    image_size: int = _param(0, "resize images to N x N (0 = keep the native size)")
    metric: str = _param("val_accuracy", "validation metric the search optimizes")
    direction: str = _param("maximize", "maximize or minimize the metric")
    patience: int = _param(3, "early-stopping patience in epochs")
    val_fraction: float = _param(0.2, "share of the train split held out for validation")
    # issue 5: speed (threads, devices, batch size)
    threads: int = _param(0, "TensorFlow intra-op threads of this worker (0 = one per core)")
    batch_size: int = _param(0, "batch size for every trial and the refit, overriding the space's (0 = the space's)")
    mixed_precision: int = _param(0, "1 = train in mixed float16 precision (GPU only)")

    def __post_init__(self):
        checks = [
            (self.n_trials >= 1, "n_trials", "must be >= 1"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.cv_folds >= 1, "cv_folds", "must be >= 1"),
            (self.timeout >= 0, "timeout", "must be >= 0 (0 = no limit)"),
            (self.image_size >= 0, "image_size", "must be >= 0 (0 = native size)"),
            (self.patience >= 1, "patience", "must be >= 1"),
            (self.threads >= 0, "threads", "must be >= 0 (0 = one per core)"),
            (self.batch_size >= 0, "batch_size", "must be >= 0 (0 = the search space's)"),
            (self.mixed_precision in (0, 1), "mixed_precision", "must be 0 or 1"),
            (0.0 < self.val_fraction < 1.0, "val_fraction", "must be between 0 and 1"),
            (self.pruner in PRUNERS, "pruner", f"must be one of {', '.join(PRUNERS)}"),
            (self.direction in ("maximize", "minimize"), "direction", "must be maximize or minimize"),
            (self.metric.startswith("val_"), "metric", "must be a validation metric (val_*)"),
            (bool(self.dataset), "dataset", "must not be empty"),
            (bool(self.storage), "storage", "must not be empty"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise PipelineError(f"{name}={getattr(self, name)!r}: {why}")

    @property
    def study(self) -> str:
        """The study name, derived from the dataset and space when not given."""
        if self.study_name:
            return self.study_name
        from pathlib import Path

        data = Path(self.dataset.rstrip("/")).name.split(".")[0] or "data"
        return f"{data}-{Path(self.search_space).stem}"

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


def fields():
    """(name, type, default, help) of every setting, in declaration order."""
    types = {"int": int, "float": float, "str": str}
    return [(f.name, types[f.type], f.default, f.metadata["help"]) for f in dataclasses.fields(Settings)]

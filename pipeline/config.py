"""Run settings: one dataclass, validated early, shared by the CLI and MLproject.

Every user-facing parameter is a field of `Settings`; `pipeline.cli` turns each field
into a `--name` option (dashes or underscores) and MLproject passes the same names.
Unknown or ill-typed values are rejected before any data is loaded or any run is made.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from pipeline.errors import PipelineError
from pipeline.names import mask

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
EXTRA_OBJECTIVES = ("params", "latency_ms")  # minimized beside the metric in multi-objective studies
DEFAULT_OBJECTIVES = "val_accuracy"
METRICS = ("val_accuracy", "val_loss", "val_f1_macro", "val_balanced_accuracy")  # the validation metrics a fit reports
BALANCED_METRICS = ("val_f1_macro", "val_balanced_accuracy")  # every class counts alike (maximized)
CLASS_WEIGHTS = ("none", "balanced")  # the `class_weight` setting: Keras' loss weight per class
BACKENDS = ("tensorflow", "jax", "torch")  # Keras 3's backends
PRECISIONS = ("auto", "float32", "bfloat16")  # the `precision` setting (pipeline.device)
SEARCHES = ("main", "search")  # the commands that search
REFITS = ("main", "refit")  # the commands that refit and test
SEED_SPACE = "search_spaces/seed.yaml"  # the default space: the tutorial's, for digits and CIFAR-10
FOLDER_SPACE = "search_spaces/photos.yaml"  # the default space of an image folder: a user's own photos
CLUSTER_ADDRESS = re.compile(r"(tcp|tls|ws|wss|ucx)://[^\s/]+")  # a Dask scheduler's (the `cluster` setting)


def shared_storage(storage: str) -> bool:
    """Whether a cluster's workers can share the study in `storage`: a database server's, or a journal
    file by its absolute path (a cluster on one machine: a journal's dead workers are found by their
    pid on this host, pipeline.recover); not a SQLite file (locked whole on every write) or a path
    relative to each worker's folder."""
    return os.path.expandvars(storage).startswith(("postgresql", "mysql", "journal:///"))


def _param(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    dataset: str = _param("digits", "digits, cifar10, a CIFAR-10 python archive/folder, or an image folder")
    search_space: str = _param("", f"search-space YAML file (default: {FOLDER_SPACE} for an image folder, "
                                   f"{SEED_SPACE} otherwise); a relative path not found here is read "
                                   "from the project's own")
    n_trials: int = _param(20, "trial budget of the whole study (all workers together)")
    timeout: int = _param(0, "study-wide deadline: seconds after the first worker starts (0 = no limit)")
    epochs: int = _param(10, "epoch cap of each trial")
    study_name: str = _param("", "Optuna study name (default: <dataset>-<space>)")
    storage: str = _param("sqlite:///optuna.db", "Optuna storage URL")
    seed: int = _param(42, "seed of the sampler, the splits and the weights")
    cv_folds: int = _param(1, "1 = hold-out validation (an image folder's validation/ folder where it has one); "
                              "k > 1 = stratified k-fold CV (over train/ and validation/ pooled where both exist)")
    pruner: str = _param("median", "median, hyperband or none")
    sampler: str = _param("tpe", "tpe (Optuna's TPE, seeded per trial) or random (the tutorial's randomized search)")
    experiment_name: str = _param("cnn-search", "MLflow experiment (ignored under `mlflow run`, which picks its own)")
    image_size: int = _param(0, "resize images to N x N (0 = keep the native size)")
    metric: str = _param("val_accuracy", "validation metric the search optimizes, prunes and ranks rungs by: "
                                         "val_accuracy, val_loss (direction minimize), or, for imbalanced classes, "
                                         "val_f1_macro or val_balanced_accuracy (macro F1, mean recall per class; "
                                         "maximize)")
    direction: str = _param("maximize", "maximize or minimize the metric")
    patience: int = _param(3, "early-stopping patience in epochs")
    val_fraction: float = _param(0.2, "share of the train split held out for validation (unused where an image "
                                      "folder has validation/, val/ or valid/ beside train/: that folder validates)")
    # issue 4: results a person can read
    registered_model_name: str = _param("", "MLflow registered model of the refit (default: the study name)")
    # issue 3: distributed, resumable, crash-safe studies
    heartbeat_interval: int = _param(10, "seconds between a running trial's heartbeats (RDB storages)")
    grace_period: int = _param(30, "seconds without a heartbeat before a trial counts as dead (RDB storages); "
                                   "workers wait out a database outage of grace_period - heartbeat_interval s")
    # issue 6: multi-objective search, warm starts, space dry run
    objectives: str = _param(DEFAULT_OBJECTIVES, "comma list: the metric first, then params and/or latency_ms (minimized)")
    select: str = _param("", "refit rule for multi-objective studies, e.g. max_params=50000 (default: most accurate)")
    warm_start: str = _param("", "YAML file of known configurations enqueued before sampling")
    samples: int = _param(5, "configurations the `space` dry run samples")
    # issue 7: published models as baselines
    baselines: str = _param("search_spaces/baselines.yaml", "configurations file of the `baselines` command")
    only: str = _param("", "comma list of configuration names to use from warm_start / baselines (default: all)")
    # issue 5: speed (threads, devices, batch size)
    threads: int = _param(0, "intra-op threads of this worker, TensorFlow or PyTorch (0 = one per core)")
    batch_size: int = _param(0, "batch size for every trial and the refit, overriding the space's (0 = the space's)")
    mixed_precision: int = _param(0, "1 = train in mixed 16-bit precision: bfloat16 or float16, as the GPU suits (GPU only)")
    # issue 37: the CPU's fast path
    precision: str = _param("auto", "auto, float32 or bfloat16 (Keras' mixed_bfloat16: float32 weights, bfloat16 "
                                    "compute, float32 output); auto = bfloat16 on a CPU that computes it natively "
                                    "(AVX512-BF16 or AMX), else float32; on a GPU auto = mixed_precision's choice")
    # issue 15: what a user sees
    system_metrics: int = _param(0, "1 = log MLflow's system metrics (CPU, memory, GPU) for trial and refit runs")
    # issue 12: the refit is part of the hour
    refit_epochs: int = _param(0, "epochs of the refit, its schedule's span (0 = the best trial's best epoch count)")
    # issue 13: every Keras backend
    backend: str = _param("", "Keras backend: tensorflow, jax or torch (default: KERAS_BACKEND, else tensorflow)")
    # issue 22: a search that pays inside a wall-clock budget
    time_budget: int = _param(0, "seconds of wall time for the whole command: load, search, refit, test, logging "
                                 "(0 = no budget; timeout, epochs and refit_epochs still override the plan)")
    rungs: str = _param("", "successive halving: comma list of epochs per rung, e.g. 1,3,9; off = none; "
                            "empty = planned from time_budget (off without one)")
    eta: int = _param(3, "successive halving: the top 1/eta of a rung's evaluations are trained again at the next")
    # issue 36: the search earns its time
    search_share: str = _param("auto", "share of a time budget (after loading and the reserve) the search gets: "
                                       "auto = from how many full runs of the space's default the budget pays for; "
                                       "0 = no search, the default (or first warm start) trained for the whole budget")
    workers: int = _param(1, "worker processes on this machine sharing the study (main, search); "
                             "threads then counts per worker (0 = the cores split between them); with cluster, "
                             "tasks on that cluster")
    # issue 38: workers on a cluster
    cluster: str = _param("", "Dask scheduler address, e.g. tcp://host:8786 (main, search): the `workers` search "
                              "workers run as tasks on that cluster, each taking `threads` cores (0 = 1) as the Dask "
                              "resource `cores`; storage must be a database every Dask worker reaches")
    # issue 40: a user's image folders as they come
    class_weight: str = _param("none", "none or balanced: weigh each class's loss by n / (classes x its count) "
                                       "in every fit, the trials' and the refit's (for imbalanced classes)")

    def __post_init__(self):
        if not self.search_space:  # the default depends on the dataset
            from pipeline.data import is_image_folder

            object.__setattr__(self, "search_space", FOLDER_SPACE if is_image_folder(self.dataset) else SEED_SPACE)
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
            (self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}"),
            (not (self.mixed_precision and self.precision == "float32"), "precision",
             "contradicts mixed_precision=1 (use auto)"),
            (self.system_metrics in (0, 1), "system_metrics", "must be 0 or 1"),
            (0.0 < self.val_fraction < 1.0, "val_fraction", "must be between 0 and 1"),
            (self.pruner in PRUNERS, "pruner", f"must be one of {', '.join(PRUNERS)}"),
            (self.sampler in SAMPLERS, "sampler", f"must be one of {', '.join(SAMPLERS)}"),
            (self.direction in ("maximize", "minimize"), "direction", "must be maximize or minimize"),
            (self.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)} (what a fit reports)"),
            (self.metric not in BALANCED_METRICS or self.direction == "maximize", "metric",
             f"is maximized: set direction=maximize (direction={self.direction!r})"),
            (self.class_weight in CLASS_WEIGHTS, "class_weight", f"must be one of {', '.join(CLASS_WEIGHTS)}"),
            (bool(self.dataset), "dataset", "must not be empty"),
            (bool(self.storage), "storage", "must not be empty"),
            (not set("/:") & set(self.registered_model_name), "registered_model_name", "must not contain '/' or ':'"),
            (self.heartbeat_interval >= 1, "heartbeat_interval", "must be >= 1"),
            (self.grace_period > self.heartbeat_interval, "grace_period", "must be > heartbeat_interval"),
            (self.samples >= 1, "samples", "must be >= 1"),
            (self.refit_epochs >= 0, "refit_epochs", "must be >= 0 (0 = the best trial's epoch count)"),
            (self.backend in ("", *BACKENDS), "backend", f"must be one of {', '.join(BACKENDS)}"),
            (self.time_budget >= 0, "time_budget", "must be >= 0 seconds (0 = no budget)"),
            (self.eta >= 2, "eta", "must be >= 2"),
            (self.workers >= 1, "workers", "must be >= 1"),
            (not self.cluster or bool(CLUSTER_ADDRESS.fullmatch(self.cluster)), "cluster",
             "expected a Dask scheduler address such as tcp://host:8786"),
            (not self.cluster or shared_storage(self.storage), "storage",
             "serves this machine alone (a SQLite file or a relative path): with cluster, pass --storage "
             "postgresql://user@host:5432/db that every Dask worker reaches (or mysql://..., or journal:///abs/path "
             "for a cluster on this one machine)"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise PipelineError(f"{name}={getattr(self, name)!r}: {why}")
        self.select_rules  # noqa: B018 -- parses (and so validates) objectives and select now
        self.rung_epochs  # noqa: B018 -- and rungs
        self.share  # noqa: B018 -- and search_share

    @property
    def space_line(self) -> str:
        """The space in one line, and where it is an image folder's default, that it is."""
        if self.search_space != FOLDER_SPACE:
            return f"search space: {self.search_space}"
        return f"search space: {FOLDER_SPACE}, the default of an image folder (search_space={SEED_SPACE}: the tutorial's)"

    @property
    def keras_backend(self) -> str:
        """`backend`, else KERAS_BACKEND, else tensorflow."""
        name = self.backend or os.environ.get("KERAS_BACKEND") or "tensorflow"
        if name not in BACKENDS:
            raise PipelineError(f"KERAS_BACKEND={name!r}: must be one of {', '.join(BACKENDS)}")
        return name

    @property
    def objective_names(self) -> list[str]:
        """The objectives, metric first: `val_accuracy,params` -> [metric, "params"].

        The first objective is the search metric (optimized in `direction`); the others are
        minimized. The default `val_accuracy` stands for whatever `metric` is.
        """
        names = [n.strip() for n in self.objectives.split(",")]
        extra = names[1:]
        if names[0] != self.metric and self.objectives != DEFAULT_OBJECTIVES:
            raise PipelineError(f"objectives={self.objectives!r}: the first objective must be metric={self.metric!r}")
        bad = [n for n in extra if n not in EXTRA_OBJECTIVES]
        if bad or len(set(extra)) != len(extra):
            raise PipelineError(f"objectives={self.objectives!r}: after the metric, each of "
                                f"{', '.join(EXTRA_OBJECTIVES)} at most once")
        return [self.metric, *extra]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_names) > 1

    @property
    def directions(self) -> list[str]:
        return [self.direction] + ["minimize"] * (len(self.objective_names) - 1)

    @property
    def sign(self) -> int:
        """1 where the metric is maximized, -1 where minimized: `sign * value` is larger when better."""
        return 1 if self.direction == "maximize" else -1

    @property
    def pruning(self) -> bool:
        """Optuna prunes single-objective studies only."""
        return self.pruner != "none" and not self.multi_objective

    @property
    def select_rules(self) -> dict[str, float]:
        """`max_params=50000,max_latency_ms=2` -> {"params": 50000.0, "latency_ms": 2.0}."""
        rules, extra = {}, self.objective_names[1:]
        for rule in filter(None, (r.strip() for r in self.select.split(","))):
            key, _, value = rule.partition("=")
            name = key.strip().removeprefix("max_")
            try:
                limit = float(value)
            except ValueError:
                limit = None
            if not key.strip().startswith("max_") or name not in extra or limit is None:
                raise PipelineError(f"select={self.select!r}: expected max_<objective>=<number> for an objective "
                                    f"after the metric in objectives={self.objectives!r}")
            rules[name] = limit
        return rules

    @property
    def rung_epochs(self) -> list[int] | None:
        """`rungs` as epochs per rung, rising: `1,3,9` -> [1, 3, 9]; `off` -> []; empty -> None
        (planned: successive halving under a `time_budget`, none without one)."""
        text = self.rungs.strip()
        if not text:
            return None
        if text == "off":
            return []
        try:
            epochs = [int(r) for r in text.split(",")]
        except ValueError:
            epochs = []
        if not epochs or any(e < 1 for e in epochs) or epochs != sorted(set(epochs)):
            raise PipelineError(f"rungs={self.rungs!r}: expected rising epoch counts >= 1 such as 1,3,9, or off")
        return epochs

    @property
    def share(self) -> float | None:
        """`search_share` as a number in [0, 1), None for auto (the planner decides)."""
        if self.search_share.strip() == "auto":
            return None
        try:
            share = float(self.search_share)
        except ValueError:
            share = -1.0
        if not 0.0 <= share < 1.0:
            raise PipelineError(f"search_share={self.search_share!r}: expected auto or a number in [0, 1)")
        return share

    @property
    def only_names(self) -> list[str]:
        return [n.strip() for n in self.only.split(",") if n.strip()]

    @property
    def study(self) -> str:
        """The study name, derived from the dataset and space when not given."""
        if self.study_name:
            return self.study_name
        from pathlib import Path

        data = Path(self.dataset.rstrip("/")).name.split(".")[0] or "data"
        return f"{data}-{Path(self.search_space).stem}"

    @property
    def model_name(self) -> str:
        """The registered model name: `registered_model_name`, or the study name made valid."""
        return self.registered_model_name or self.study.replace("/", "-").replace(":", "-")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def argv(self, command: str) -> list[str]:
        """`python -m pipeline <command>`'s arguments for every setting that differs from its
        default, the study name and the storage always (as given: `$VAR` stays unexpanded)."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default}
        options.update(study_name=self.study, storage=self.storage)
        return [command, *(a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v)))]

    def command_line(self, command: str) -> str:
        """`argv` as one line to copy, any password masked."""
        args = self.argv(command)
        return " ".join(["python -m pipeline", *(_quoted(mask(a)) for a in args)])


def _quoted(value) -> str:
    import shlex

    return shlex.quote(str(value))


def fields():
    """(name, type, default, help) of every setting, in declaration order."""
    types = {"int": int, "float": float, "str": str}
    return [(f.name, types[f.type], f.default, f.metadata["help"]) for f in dataclasses.fields(Settings)]

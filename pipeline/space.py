"""Search spaces: a YAML file turned into `sample(trial) -> params`, a plain dict.

File format (see search_spaces/seed.yaml):

    depth: {low: 1, high: 3}        # number of conv blocks
    first_block: {filters: [16, 32, 64], kernel_size: 3, pool_size: 2}
    later_blocks: {filters: [16, 32, 64], kernel_size: [3, 6, 9], pool_size: [2, 4]}
    block3: {filters: 128}          # optional: block i's own settings over later_blocks'
    dense: {units: {low: 50, high: 999}}
    training: {optimizer: adam, learning_rate: 0.001, batch_size: 32}
    augment: {flip: true, translate: 2}   # optional: training-time augmentation (flip: alternating too)
    head: global_avg                      # optional: flatten (default), global_avg or global_max
    activation: gelu                      # optional: relu (default) or gelu
    default: {depth: 2, conv1_filters: 32, ...}   # optional: the configuration to train without searching

`default` is what a user would train without a search: the first evaluation of every rung of a
budgeted search, the prior its sampling is centred on, and the control the refit keeps unless a
challenger beats it (pipeline.budget.prior). It is completed and checked as a warm start is
(`checked`), and is not part of the space's identity (`digest`): a study made before a space
declared its default resumes.

Every setting is a fixed value, a list of choices, or a range `{low, high}` with optional
`log: true` or `step`. Block settings are sampled per block that exists, as `conv<i>_<key>`;
dense settings as `dense_<key>`; augment settings as `augment_<key>`; training settings and
the top-level settings (TOP_SETTINGS: `head`, `activation`, ...) by their own name. Keys in
OPTIONAL_DEFAULTS are absent from the params of a space that does not name them, so older
spaces keep their exact params.

    python -m pipeline space --search-space FILE    # validate and show sampled models
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

OPTIMIZERS = ("adam", "adamw", "adadelta", "sgd", "nesterov", "rmsprop")
POOLINGS = ("max", "avg")
SCHEDULES = ("constant", "cosine", "onecycle")
HEADS = ("flatten", "global_avg", "global_max")
ACTIVATIONS = ("relu", "gelu")
BLOCK_ORDERS = ("conv_bn_act", "conv_pool_bn_act")
CONV_INITS = ("default", "dirac")
POOL_PADDINGS = ("same", "valid")
TTAS = ("none", "flip", "flip_shift")
WEIGHT_AVERAGES = ("none", "ema", "lookahead")

# key -> (type, check on each value, what the check means)
_POSITIVE = (lambda v: v >= 1, ">= 1")
_RATE = (lambda v: 0 <= v < 1, "in [0, 1)")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_ABOVE_ZERO = (lambda v: v > 0, "> 0")
_FLAG = (lambda v: True, "")


def _one_of(values: tuple) -> tuple:
    """(type, check, meaning) of a string setting that takes one of `values`."""
    return (str, lambda v: v in values, f"one of {values}")


BLOCK_KEYS = {
    "filters": (int, *_POSITIVE),
    "kernel_size": (int, *_POSITIVE),
    "pool_size": (int, *_POSITIVE),
    "convs": (int, *_POSITIVE),
    "pooling": _one_of(POOLINGS),
    "batch_norm": (bool, *_FLAG),
    "dropout": (float, *_RATE),
    "conv_dropout": (float, *_RATE),
    "residual": (bool, *_FLAG),
}
DENSE_KEYS = {
    "units": (int, *_POSITIVE),
    "layers": (int, *_NON_NEGATIVE),
    "dropout": (float, *_RATE),
    "max_norm": (float, lambda v: v >= 0, ">= 0 (0 = none)"),
}
TRAINING_KEYS = {
    "optimizer": _one_of(OPTIMIZERS),
    "learning_rate": (float, *_ABOVE_ZERO),
    "batch_size": (int, *_POSITIVE),
    "schedule": _one_of(SCHEDULES),
    "warmup": (float, *_RATE),
    "label_smoothing": (float, *_RATE),
    "weight_decay": (float, *_NON_NEGATIVE),
    "momentum": (float, *_RATE),
}
AUGMENT_KEYS = {
    "flip": ((bool, str), lambda v: isinstance(v, bool) or v == "alternating", "true, false or 'alternating'"),
    "translate": (int, lambda v: v >= 0, ">= 0 pixels (0 = off)"),
    "cutout": (int, lambda v: v >= 0, ">= 0 pixels (0 = off)"),
}
TOP_SETTINGS = {  # top-level keys that are settings
    "head": _one_of(HEADS),
    "activation": _one_of(ACTIVATIONS),
    "head_scale": (float, *_ABOVE_ZERO),
    "bn_scale": (bool, *_FLAG),
    "bn_momentum": (float, *_RATE),
    "bn_bias_lr": (float, *_ABOVE_ZERO),
    "block_order": _one_of(BLOCK_ORDERS),
    "conv_init": _one_of(CONV_INITS),
    "pool_padding": _one_of(POOL_PADDINGS),
    "whiten": (bool, *_FLAG),
    "whiten_kernel": (int, *_POSITIVE),
    "tta": _one_of(TTAS),
    "weight_average": _one_of(WEIGHT_AVERAGES),
}
DEFAULTS = {
    "block": {"convs": 1, "pooling": "max", "batch_norm": False, "dropout": 0.0},
    "dense": {"units": 128, "layers": 1, "dropout": 0.0},
    "training": {"optimizer": "adam", "learning_rate": 0.001, "batch_size": 32},
    "augment": {},
    "top": {},
}
# Keys a space may name but that are absent from its params when it does not (so older spaces,
# seed.yaml included, keep their exact params); the builder's defaults for them. A callable
# default depends on the params completed so far (momentum and weight decay on the optimizer:
# pipeline.model.make_optimizer).
OPTIONAL_DEFAULTS = {
    "block": {"conv_dropout": 0.0, "residual": False},
    "dense": {"max_norm": 0.0},
    "training": {"schedule": "constant", "warmup": 0.0, "label_smoothing": 0.0,
                 "weight_decay": lambda p: 0.004 if p.get("optimizer") == "adamw" else 0.0,
                 "momentum": lambda p: 0.9 if p.get("optimizer") == "nesterov" else 0.0},
    "augment": {"flip": False, "translate": 0, "cutout": 0},
    "top": {"head": "flatten", "activation": "relu", "head_scale": 1 / 9, "bn_scale": True, "bn_momentum": 0.9,
            "bn_bias_lr": 1.0, "block_order": "conv_bn_act", "conv_init": "default",
            "pool_padding": "same", "whiten": False, "whiten_kernel": 2, "tta": "none",
            "weight_average": "none"},
}
SECTIONS = {"first_block": BLOCK_KEYS, "later_blocks": BLOCK_KEYS, "dense": DENSE_KEYS, "training": TRAINING_KEYS,
            "augment": AUGMENT_KEYS}
# sections other than the blocks: (kind in DEFAULTS, prefix of their params); "top" holds TOP_SETTINGS
FLAT_SECTIONS = {"dense": ("dense", "dense_"), "training": ("training", ""), "augment": ("augment", "augment_"),
                 "top": ("top", "")}
TOP_KEYS = {"description", "depth", "default", *TOP_SETTINGS, *SECTIONS}


@dataclass(frozen=True)
class Dim:
    """One setting: fixed value, categorical choices, or an int/float range."""

    kind: str  # "fixed" | "choice" | "int" | "float"
    value: Any = None
    choices: tuple = ()
    low: float = 0
    high: float = 0
    log: bool = False
    step: float | None = None

    def sample(self, trial, name: str):
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value) -> bool:
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "choice":
            return value in self.choices
        return _typed(value, int if self.kind == "int" else float) and self.low <= value <= self.high


def _typed(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _dim(spec, typ, check, meaning, where: str) -> Dim:
    """Parse one setting; `where` names the file and key for errors."""

    def bad(msg):
        return PipelineError(f"{where}: {msg}")

    def one(value):
        if not _typed(value, typ):
            names = " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__
            raise bad(f"expected {names}, got {value!r}")
        if not check(value):
            raise bad(f"{value!r} must be {meaning}")
        return float(value) if typ is float else value

    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown:
            raise bad(f"unknown range key(s) {sorted(unknown)} (allowed: low, high, log, step)")
        if typ not in (int, float) or "low" not in spec or "high" not in spec:
            raise bad("a range needs numeric 'low' and 'high'")
        low, high = one(spec["low"]), one(spec["high"])
        if low > high:
            raise bad(f"empty range: low {low} > high {high}")
        log = spec.get("log", False)
        if not isinstance(log, bool) or (log and low <= 0):
            raise bad("'log' must be true/false, and a log range needs low > 0")
        step = spec.get("step")
        if step is not None and (not _typed(step, typ) or step <= 0):
            raise bad(f"'step' must be a positive {typ.__name__}")
        return Dim("int" if typ is int else "float", low=low, high=high, log=log, step=step)
    if isinstance(spec, list):
        if not spec:
            raise bad("empty list of choices")
        return Dim("choice", choices=tuple(one(v) for v in spec))
    return Dim("fixed", value=one(spec))


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. `sample(trial)` is the only place that talks to Optuna."""

    path: str
    depth: Dim
    sections: dict  # section name -> {key: Dim}
    digest: str  # hash of the parsed content (its `default` left out), to tell spaces apart across runs
    default: dict | None = None  # the completed default configuration, if the file declares one

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def _block_dims(self, i: int) -> dict:
        return self.sections.get(f"block{i}") or self.sections["first_block" if i == 1 else "later_blocks"]

    def sample(self, trial) -> dict:
        """Turn a trial into a plain dict of params (fixed settings included)."""
        params = {"depth": self.depth.sample(trial, "depth")}
        for i in range(1, params["depth"] + 1):
            for key, dim in self._block_dims(i).items():
                params[f"conv{i}_{key}"] = dim.sample(trial, f"conv{i}_{key}")
        for section, (_, prefix) in FLAT_SECTIONS.items():
            for key, dim in self.sections[section].items():
                params[f"{prefix}{key}"] = dim.sample(trial, f"{prefix}{key}")
        return params

    def _expected(self, depth: int) -> dict:
        """name -> (Dim, builder default) of every param a configuration of `depth` blocks has."""
        def section(dims, kind, prefix):
            defaults = {**DEFAULTS[kind], **OPTIONAL_DEFAULTS[kind]}
            return {f"{prefix}{k}": (d, defaults.get(k)) for k, d in dims.items()}

        expected = {"depth": (self.depth, None)}
        for i in range(1, depth + 1):
            expected.update(section(self._block_dims(i), "block", f"conv{i}_"))
        for name, (kind, prefix) in FLAT_SECTIONS.items():
            expected.update(section(self.sections[name], kind, prefix))
        return expected

    def complete(self, params: dict) -> dict:
        """`params` with the settings it leaves out filled in: the space's fixed value, else
        the builder's default where the space allows it (what `violations` then checks)."""
        depth = params.get("depth", self.depth.value if self.depth.kind == "fixed" else None)
        if not isinstance(depth, int) or isinstance(depth, bool):
            return dict(params)
        full = {}
        for name, (dim, default) in self._expected(depth).items():
            if name in params:
                full[name] = params[name]
            elif dim.kind == "fixed":
                full[name] = dim.value
            elif default is not None:
                value = default(full) if callable(default) else default
                if dim.contains(value):
                    full[name] = value
        return {**full, **{k: v for k, v in params.items() if k not in full}}

    def violations(self, params: dict) -> list[str]:
        """Why `params` is not a configuration of this space ([] when it is)."""
        problems = []
        depth = params.get("depth")
        if not self.depth.contains(depth):
            return [f"depth={depth!r} is outside the space"]
        expected = {name: dim for name, (dim, _) in self._expected(depth).items()}
        for name, dim in expected.items():
            if name not in params:
                problems.append(f"{name} is missing")
            elif not dim.contains(params[name]):
                problems.append(f"{name}={params[name]!r} is outside the space")
        problems += [f"{name} is not a setting of this space" for name in sorted(set(params) - set(expected))]
        return problems

    def checked(self, params: dict, where: str) -> dict:
        """`params` completed (`complete`); a one-line error naming `where` and the first
        violation where it is not a configuration of this space."""
        params = self.complete(params)
        problems = self.violations(params)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PipelineError(f"{where} is outside search space {self.path}: {problems[0]}{more}")
        return params


PROJECT_DIR = Path(__file__).resolve().parents[1]  # the checkout, or site-packages: search_spaces/ lies beside pipeline/


def project_file(path: Path) -> Path:
    """`path`; or, where it is relative and not found from the working directory, the project's
    own file of that name, so the defaults (search_spaces/seed.yaml, ...) work from anywhere."""
    if path.is_absolute() or path.exists() or not (PROJECT_DIR / path).exists():
        return path
    return PROJECT_DIR / path


def read_yaml(path: Path, file_kind: str, content: str, documents: bool = False):
    """The parsed YAML of `path` (`documents`: a list of its `---`-separated documents, empty ones
    left out), read where `project_file` finds it; a missing or unreadable file is a one-line
    error naming `path` as given."""
    try:
        text = project_file(path).read_text()
        if documents:
            return [d for d in yaml.safe_load_all(text) if d is not None]
        return yaml.safe_load(text)
    except FileNotFoundError:
        raise PipelineError(f"{path}: {file_kind} file not found") from None
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: cannot read {content}: {str(e).splitlines()[0]}") from None


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; errors name the file and key."""
    path = Path(path)
    raw = read_yaml(path, "search-space", "search space")
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a search space must be a YAML mapping")
    blocks = {k for k in raw if re.fullmatch(r"block[2-9][0-9]*", str(k))}  # block<i>: later_blocks' overrides
    unknown = set(raw) - TOP_KEYS - blocks
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {sorted(unknown)} (allowed: {sorted(TOP_KEYS)})")
    if "depth" not in raw:
        raise PipelineError(f"{path}: missing key 'depth'")
    depth = _dim(raw["depth"], int, *_POSITIVE, f"{path}: key 'depth'")
    max_depth = depth.high if depth.kind == "int" else max(depth.choices or (depth.value,))
    sections = {}
    for section, keys in SECTIONS.items():
        spec = raw.get(section)
        needed = section == "first_block" or (section == "later_blocks" and max_depth > 1)
        if spec is None and needed:
            raise PipelineError(f"{path}: missing key '{section}' (needed for depth up to {max_depth})")
        if spec is None and section == "later_blocks":
            continue
        spec = spec or {}
        if not isinstance(spec, dict):
            raise PipelineError(f"{path}: key '{section}' must be a mapping")
        unknown = set(spec) - set(keys)
        if unknown:
            raise PipelineError(f"{path}: unknown key(s) {sorted(unknown)} in '{section}' (allowed: {sorted(keys)})")
        merged = {**DEFAULTS["block" if "block" in section else section], **spec}
        dims = {}
        for key, value in merged.items():
            typ, check, meaning = keys[key]
            dims[key] = _dim(value, typ, check, meaning, f"{path}: key '{section}.{key}'")
        for key in ("filters", "kernel_size", "pool_size") if "block" in section else ():
            if key not in dims:
                raise PipelineError(f"{path}: missing key '{section}.{key}'")
        sections[section] = dims
    sections.setdefault("later_blocks", sections["first_block"])
    for block in sorted(blocks):
        spec = raw[block]
        if not isinstance(spec, dict) or set(spec) - set(BLOCK_KEYS):
            raise PipelineError(f"{path}: key '{block}' must be a mapping of block keys (allowed: {sorted(BLOCK_KEYS)})")
        sections[block] = {**sections["later_blocks"], **{
            key: _dim(value, *BLOCK_KEYS[key], f"{path}: key '{block}.{key}'") for key, value in spec.items()}}
    sections["top"] = {key: _dim(raw[key], *TOP_SETTINGS[key], f"{path}: key '{key}'")
                       for key in TOP_SETTINGS if key in raw}
    identity = {k: v for k, v in raw.items() if k != "default"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    space = SearchSpace(str(path), depth, sections, digest)
    if "default" not in raw:
        return space
    if not isinstance(raw["default"], dict):
        raise PipelineError(f"{path}: key 'default' must be a mapping of params (the configuration to train "
                            "without searching)")
    return dataclasses.replace(space, default=space.checked(raw["default"], f"{path}: key 'default'"))

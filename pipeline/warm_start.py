"""Known configurations: a YAML file of named params dicts, validated against a space, and
enqueued into a study before the sampler proposes anything (Optuna's `enqueue_trial`).

File format (see search_spaces/seed_best.yaml, search_spaces/baselines.yaml):

    search_space: seed.yaml        # the space the configurations belong to (relative to this file)
    configurations:
      tutorial_best: {depth: 2, conv1_filters: 32, conv2_kernel_size: 9, dense_units: 750, ...}

Params are the flat names a trial logs (`conv<i>_<key>`, `dense_<key>`, training keys); a
setting left out takes the space's fixed value, else the builder's default if the space
allows it. Used by `warm_start=FILE` (main/search) and by the `baselines` command.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from pipeline import names
from pipeline.errors import PipelineError
from pipeline.space import SearchSpace, load_space, read_yaml



def read_file(path: str | Path) -> tuple[Path, dict]:
    """The space file a configurations file names and its raw {name: params} mapping."""
    path = Path(path)
    raw = read_yaml(path, "configurations", "configurations")
    if not isinstance(raw, dict) or set(raw) - {"search_space", "description", "configurations"}:
        raise PipelineError(f"{path}: expected a mapping with keys search_space, configurations (and description)")
    configs = raw.get("configurations")
    if not isinstance(configs, dict) or not configs:
        raise PipelineError(f"{path}: key 'configurations' must map names to params")
    for name, params in configs.items():
        if not isinstance(params, dict):
            raise PipelineError(f"{path}: configuration {name!r} must be a mapping of params")
    if not isinstance(raw.get("search_space"), str):
        raise PipelineError(f"{path}: key 'search_space' must name the space file the configurations belong to")
    return path.parent / raw["search_space"], configs


def load_configurations(path: str | Path, space: SearchSpace | None = None, only: list[str] = ()) -> tuple[SearchSpace, dict]:
    """Validated, completed configurations {name: params} (all, or those named in `only`).

    Each is checked against `space`, or against the space the file names when none is given.
    A configuration outside it is an error naming the file, the configuration and the setting.
    """
    space_path, configs = read_file(path)
    space = space or load_space(space_path)
    unknown = [n for n in only if n not in configs]
    if unknown:
        raise PipelineError(f"only={','.join(only)}: {path} has no configuration {unknown[0]!r} "
                            f"(it has {', '.join(configs)})")
    chosen = {}
    for name in only or configs:
        params = space.complete(configs[name])
        problems = space.violations(params)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PipelineError(f"{path}: configuration {name!r} is outside search space {space.path}: "
                                f"{problems[0]}{more}")
        chosen[name] = params
    return space, chosen


def enqueue(study: optuna.Study, configs: dict) -> list[str]:
    """Enqueue the configurations this study has not had yet; returns their names.

    The names enqueued are recorded in the study, so a resume or another worker does not
    enqueue them again; `skip_if_exists` also skips a configuration already tried or waiting.
    """
    done = dict(study.user_attrs.get(names.WARM_STARTED, {}))
    new = [name for name, params in configs.items() if done.get(name) != params]
    for name in new:
        study.enqueue_trial(configs[name], user_attrs={names.WARM_START: name}, skip_if_exists=True)
        done[name] = configs[name]
    if new:
        study.set_user_attr(names.WARM_STARTED, done)
    return new

"""Known configurations: a YAML file of named params dicts, validated against a space, and
enqueued into a study before the sampler proposes anything (Optuna's `enqueue_trial`).

File format (see search_spaces/seed_best.yaml, search_spaces/baselines.yaml):

    search_space: seed.yaml        # the space the configurations belong to (relative to this file)
    configurations:
      tutorial_best: {depth: 2, conv1_filters: 32, conv2_kernel_size: 9, dense_units: 750, ...}
    ---                            # more documents: configurations of other spaces
    search_space: airbench.yaml
    configurations:
      airbench93: {learning_rate: 1.5, ...}

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


def read_file(path: str | Path) -> list[tuple[Path, dict]]:
    """(space file, raw {name: params}) of each YAML document of a configurations file (one
    document, or several separated by `---`, each naming its own space); names are unique."""
    path = Path(path)
    docs = read_yaml(path, "configurations", "configurations", documents=True)
    if not docs:
        raise PipelineError(f"{path}: expected a mapping with keys search_space, configurations (and description)")
    groups, seen = [], set()
    for raw in docs:
        if not isinstance(raw, dict) or set(raw) - {"search_space", "description", "configurations"}:
            raise PipelineError(f"{path}: expected a mapping with keys search_space, configurations (and description)")
        configs = raw.get("configurations")
        if not isinstance(configs, dict) or not configs:
            raise PipelineError(f"{path}: key 'configurations' must map names to params")
        for name, params in configs.items():
            if not isinstance(params, dict):
                raise PipelineError(f"{path}: configuration {name!r} must be a mapping of params")
            if name in seen:
                raise PipelineError(f"{path}: configuration {name!r} is named twice")
            seen.add(name)
        if not isinstance(raw.get("search_space"), str):
            raise PipelineError(f"{path}: key 'search_space' must name the space file the configurations belong to")
        groups.append((path.parent / raw["search_space"], configs))
    return groups


def load_groups(path: str | Path, space: SearchSpace | None = None, only: list[str] = ()) -> list[tuple[SearchSpace, dict]]:
    """(space, validated and completed configurations {name: params}) per document of the file:
    all configurations, or those named in `only`.

    Without `space` (the `baselines` command) each document's are checked against the space it
    names. With `space` (a warm start) they are checked against it, and of a file of several
    documents only those naming that space are taken (all, where none does), unless `only`
    names others. A configuration outside its space is an error naming the file, the
    configuration and the setting.
    """
    groups = read_file(path)
    every = [name for _, configs in groups for name in configs]
    unknown = [n for n in only if n not in every]
    if unknown:
        raise PipelineError(f"only={','.join(only)}: {path} has no configuration {unknown[0]!r} "
                            f"(it has {', '.join(every)})")
    if space is not None and len(groups) > 1 and not only:
        own = [g for g in groups if g[0].resolve() == Path(space.path).resolve()]
        groups = own or groups
    chosen = []
    for space_path, configs in groups:
        group_space = space or load_space(space_path)
        names_ = [n for n in only if n in configs] if only else list(configs)
        if names_:
            chosen.append((group_space, {name: group_space.checked(configs[name], f"{path}: configuration {name!r}")
                                         for name in names_}))
    return chosen


def load_configurations(path: str | Path, space: SearchSpace | None = None, only: list[str] = ()) -> tuple[SearchSpace, dict]:
    """`load_groups`' configurations as one {name: params}, with the first document's space
    (or `space`)."""
    groups = load_groups(path, space, only)
    return groups[0][0], {name: params for _, configs in groups for name, params in configs.items()}


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

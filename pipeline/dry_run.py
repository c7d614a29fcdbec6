"""The space dry run: validate a space file, sample configurations, build each model and print
its layers' output shapes and parameter count, without training anything.

    python -m pipeline space --search-space search_spaces/wide.yaml --dataset digits --samples 5

With `warm_start=FILE` its configurations are validated against the space and shown first.
Any configuration that cannot build makes the command fail (exit 2) after all are shown.
Nothing is stored: the samples come from an in-memory study with a seeded random sampler.
"""

from __future__ import annotations

import optuna

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.warm_start import load_configurations


def layer_table(model) -> list[str]:
    """One line per layer: name (type), output shape, parameters."""
    lines = [f"  {'layer':<44} {'output shape':<22} {'params':>10}"]
    for layer in model.layers:
        shape = tuple(layer.output.shape)
        lines.append(f"  {f'{layer.name} ({type(layer).__name__})':<44} {str(shape):<22} {layer.count_params():>10,}")
    return lines


def configurations(space, settings: Settings) -> list[tuple[str, dict]]:
    """(label, params): the warm-start configurations, then `samples` random draws."""
    named = []
    if settings.warm_start:
        _, configs = load_configurations(settings.warm_start, space, settings.only_names)
        named = [(f"warm start {name!r}", params) for name, params in configs.items()]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings.seed))
    sampled = []
    for k in range(1, settings.samples + 1):
        trial = study.ask()
        sampled.append((f"sample {k}", space.sample(trial)))
        study.tell(trial, 0.0)
    return named + sampled


def dry_run(space, data, settings: Settings) -> list[int]:
    """Print every configuration's model; returns their parameter counts."""
    print(f"{space.path}: valid; {data.name} input {'x'.join(map(str, data.input_shape))}, {data.n_classes} classes")
    counts, broken = [], []
    for label, params in configurations(space, settings):
        print(f"\n{label}: " + " ".join(f"{k}={v}" for k, v in params.items()))
        try:
            model = build_model(params, data.input_shape, data.n_classes)
        except Exception as e:  # any builder failure is reported, then fails the command
            broken.append(f"{label} ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            print(f"  cannot build: {broken[-1]}")
            continue
        print("\n".join(layer_table(model)))
        print(f"  parameters: {model.count_params():,}")
        counts.append(model.count_params())
    if broken:
        raise PipelineError(f"{space.path}: {len(broken)} configuration(s) cannot build, first: {broken[0]}")
    return counts

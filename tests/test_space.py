"""Search-space files: the tutorial's space exactly, validation errors naming file and key,
and every sampled configuration builds a valid model for each dataset's input shape."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from conftest import ROOT

from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.space import load_space
from pipeline.warm_start import load_groups

SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
SPACE_FILES = [p for p in SPACES if "configurations:" not in p.read_text()]  # not warm-start files


@pytest.mark.parametrize("path", [p for p in SPACES if p not in SPACE_FILES], ids=lambda p: p.name)
def test_every_shipped_configuration_file_is_valid_in_the_space_it_names(path):
    groups = load_groups(path)
    assert groups and all(configs for _, configs in groups), path


def test_seed_space_is_the_tutorials():
    space = load_space(ROOT / "search_spaces" / "seed.yaml")
    assert (space.depth.kind, space.depth.low, space.depth.high) == ("int", 1, 3)
    first, later = space.sections["first_block"], space.sections["later_blocks"]
    assert first["filters"].choices == (16, 32, 64)
    assert first["kernel_size"].value == 3 and first["pool_size"].value == 2
    assert later["filters"].choices == (16, 32, 64)
    assert later["kernel_size"].choices == (3, 6, 9)
    assert later["pool_size"].choices == (2, 4)
    units = space.sections["dense"]["units"]
    assert (units.kind, units.low, units.high) == ("int", 50, 999)
    assert space.sections["dense"]["layers"].value == 1


def test_per_block_params_exist_only_for_existing_blocks():
    space = load_space(ROOT / "search_spaces" / "seed.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    depths = set()
    for _ in range(30):
        trial = study.ask()
        params = space.sample(trial)
        depths.add(params["depth"])
        blocks = {int(k[4]) for k in params if k.startswith("conv")}
        assert blocks == set(range(1, params["depth"] + 1))
        assert set(trial.params) <= set(params)
        assert space.violations(params) == []
        study.tell(trial, 0.0)
    assert depths == {1, 2, 3}


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("input_shape", [(8, 8, 1), (32, 32, 3)], ids=["digits", "cifar"])
def test_every_sampled_configuration_builds(path, input_shape):
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    built = set()
    for _ in range(25):
        trial = study.ask()
        params = space.sample(trial)
        layers = repr(sorted((k, v) for k, v in params.items() if k.startswith(("depth", "conv", "dense", "head", "augment"))))
        if layers not in built:  # each distinct network once (the recipe spaces fix theirs)
            built.add(layers)
            model = build_model(params, input_shape, 10)
            assert model.output_shape == (None, 10), params
        study.tell(trial, 0.0)


def test_builder_smoke_fits_tiny_random_arrays():
    params = {"depth": 3, "conv1_filters": 16, "conv1_kernel_size": 3, "conv1_pool_size": 2,
              "conv2_filters": 16, "conv2_kernel_size": 9, "conv2_pool_size": 4,
              "conv3_filters": 16, "conv3_kernel_size": 9, "conv3_pool_size": 4, "dense_units": 50}
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    y = np.arange(16) % 3
    model = build_model(params, (8, 8, 1), 3)
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    probabilities = model.predict(x, verbose=0)
    assert probabilities.shape == (16, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


GOOD = """
depth: {low: 1, high: 2}
first_block: {filters: [16], kernel_size: 3, pool_size: 2}
later_blocks: {filters: [16], kernel_size: [3], pool_size: [2]}
dense: {units: {low: 10, high: 20}}
"""


@pytest.mark.parametrize(
    "text, fragment",
    [
        (GOOD + "colour: red\n", "unknown key(s) ['colour']"),
        (GOOD.replace("kernel_size: 3,", "kernel_size: three,"), "key 'first_block.kernel_size'"),
        (GOOD.replace("{low: 10, high: 20}", "{low: 20, high: 10}"), "key 'dense.units': empty range"),
        (GOOD.replace("filters: [16], kernel_size: [3]", "filters: [], kernel_size: [3]"), "key 'later_blocks.filters': empty list"),
        (GOOD.replace("{low: 1, high: 2}", "{low: 1.5, high: 2}"), "key 'depth': expected int"),
        (GOOD.replace("pool_size: 2}", "pool_size: 2, stride: 1}"), "unknown key(s) ['stride'] in 'first_block'"),
        (GOOD.replace("later_blocks: {filters: [16], kernel_size: [3], pool_size: [2]}\n", ""), "missing key 'later_blocks'"),
        (GOOD + "training: {optimizer: adagrad}\n", "key 'training.optimizer'"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("depth: {low: 1\n", "cannot read search space"),
        (GOOD + "augment: {flip: 1}\n", "key 'augment.flip': expected bool"),
        (GOOD + "augment: {translate: -2}\n", "key 'augment.translate': -2 must be >= 0 pixels"),
        (GOOD + "augment: {cutout: 2.5}\n", "key 'augment.cutout': expected int"),
        (GOOD + "augment: {rotate: 10}\n", "unknown key(s) ['rotate'] in 'augment'"),
        (GOOD + "head: max\n", "key 'head': 'max' must be one of ('flatten', 'global_avg', 'global_max')"),
        (GOOD.replace("pool_size: 2}", "pool_size: 2, residual: yes please}"), "key 'first_block.residual': expected bool"),
        (GOOD + "training: {schedule: linear}\n", "key 'training.schedule': 'linear' must be one of"),
        (GOOD + "training: {warmup: 1.0}\n", "key 'training.warmup': 1.0 must be in [0, 1)"),
        (GOOD + "training: {label_smoothing: [0.1, 1.5]}\n", "key 'training.label_smoothing': 1.5 must be in [0, 1)"),
        (GOOD + "training: {weight_decay: {low: -0.1, high: 0.1}}\n", "key 'training.weight_decay': -0.1 must be >= 0"),
        (GOOD + "training: {momentum: 1}\n", "key 'training.momentum': 1 must be in [0, 1)"),
        (GOOD + "block2: {filters: [0]}\n", "key 'block2.filters'"),
        (GOOD + "block2: {stride: 1}\n", "key 'block2' must be a mapping of block keys"),
        (GOOD + "block1: {filters: 8}\n", "unknown key(s) ['block1']"),
    ],
)
def test_broken_space_files_name_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as error:
        load_space(path)
    message = str(error.value)
    assert str(path) in message and fragment in message, message
    assert "\n" not in message


def test_missing_space_file(tmp_path):
    with pytest.raises(PipelineError, match="nope.yaml: search-space file not found"):
        load_space(tmp_path / "nope.yaml")


def test_a_relative_file_not_found_here_is_the_projects_own_and_one_here_comes_first(tmp_path):
    """A user's working directory (the tests run in their temp dir) needs no copy of the shipped
    files: the defaults and `search_spaces/<name>.yaml` are read from the checkout's, and a file of
    that name in the working directory wins over it."""
    shipped = load_space(ROOT / "search_spaces" / "seed.yaml")
    assert load_space("search_spaces/seed.yaml").digest == shipped.digest
    assert [name for _, configs in load_groups("search_spaces/baselines.yaml") for name in configs]
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "seed.yaml").write_text("depth: 1\nfirst_block: {filters: 8, kernel_size: 3, pool_size: 2}\n")
    assert load_space("search_spaces/seed.yaml").digest != shipped.digest
    with pytest.raises(PipelineError, match="^search_spaces/nope.yaml: search-space file not found$"):
        load_space("search_spaces/nope.yaml")


def test_violations_name_the_setting():
    space = load_space(ROOT / "search_spaces" / "seed.yaml")
    params = {"depth": 2, "conv1_filters": 32, "conv1_kernel_size": 3, "conv1_pool_size": 2,
              "conv2_filters": 32, "conv2_kernel_size": 9, "conv2_pool_size": 4, "dense_units": 750,
              "dense_layers": 1, "dense_dropout": 0.0, "optimizer": "adam", "learning_rate": 0.001, "batch_size": 32,
              "conv1_convs": 1, "conv1_pooling": "max", "conv1_batch_norm": False, "conv1_dropout": 0.0,
              "conv2_convs": 1, "conv2_pooling": "max", "conv2_batch_norm": False, "conv2_dropout": 0.0}
    assert space.violations(params) == []
    assert space.violations({**params, "conv2_kernel_size": 5}) == ["conv2_kernel_size=5 is outside the space"]
    assert space.violations({**params, "depth": 7}) == ["depth=7 is outside the space"]


def test_the_shipped_spaces_of_earlier_studies_are_unchanged():
    """seed.yaml and wide.yaml keep their digests (existing studies resume) and their params
    (the modern keys live in modern.yaml and cifar10.yaml only)."""
    import optuna

    legacy_block = {"convs", "pooling", "batch_norm", "dropout", "filters", "kernel_size", "pool_size"}
    for name, digest, extra in (("seed", "e6ea6b67886c0815", set()),
                                ("wide", "b6aca05c90b67cd5", {"conv_dropout"})):
        space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
        assert space.digest == digest, name
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(20):
            trial = study.ask()
            params = space.sample(trial)
            study.tell(trial, 0.0)
            blocks = {k.split("_", 1)[1] for k in params if k.startswith("conv")}
            assert blocks <= legacy_block | extra, name
            assert set(params) - {k for k in params if k.startswith("conv")} <= {
                "depth", "dense_units", "dense_layers", "dense_dropout", "dense_max_norm", "optimizer",
                "learning_rate", "batch_size"}, name

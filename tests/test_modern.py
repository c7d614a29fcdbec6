"""Modern CNN keys (issue 12): augmentation, residual blocks, trainable batch norm, the
global-average head, learning-rate schedules, label smoothing, weight decay and momentum.
Each builds, trains on digits, round-trips through a trial's params, a warm-start file and
the dry run; augmentation is the identity at inference; schedules follow their formulas;
older spaces keep their exact params (bad values: tests/test_space.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import optuna
import pytest
import yaml
from conftest import ROOT

from pipeline.dry_run import dry_run
from pipeline.model import SmoothedSparseCrossentropy, WarmupDecay, build_model
from pipeline.space import load_space
from pipeline.train import KeepModel, train, validation_splits
from pipeline.warm_start import load_configurations

MODERN_SPACE = """
depth: 2
head: [flatten, global_avg]
first_block: {filters: 8, kernel_size: 3, pool_size: 2, batch_norm: true, residual: [true, false], convs: 2}
later_blocks: {filters: [8, 16], kernel_size: 3, pool_size: 2, batch_norm: true, residual: true, dropout: 0.2}
dense: {layers: 0}
augment: {flip: [true, false], translate: {low: 0, high: 2}, cutout: [0, 3]}
training:
  optimizer: [nesterov, sgd, adamw]
  learning_rate: 0.05
  batch_size: 64
  schedule: [constant, cosine, onecycle]
  warmup: {low: 0.0, high: 0.3}
  label_smoothing: [0.0, 0.2]
  weight_decay: [0.0, 0.0005]
  momentum: [0.0, 0.9]
"""
NEW_PARAMS = {"head", "augment_flip", "augment_translate", "augment_cutout", "schedule", "warmup",
              "label_smoothing", "weight_decay", "momentum", "conv1_residual", "conv2_residual"}
# every new key switched on, on the 8x8 digits
MODERN = {"depth": 2, "head": "global_avg",
          "conv1_filters": 8, "conv1_kernel_size": 3, "conv1_pool_size": 2, "conv1_convs": 2, "conv1_batch_norm": True,
          "conv1_residual": True, "conv1_pooling": "max", "conv1_dropout": 0.0,
          "conv2_filters": 16, "conv2_kernel_size": 3, "conv2_pool_size": 2, "conv2_convs": 1, "conv2_batch_norm": True,
          "conv2_residual": True, "conv2_pooling": "max", "conv2_dropout": 0.2,
          "dense_layers": 0, "dense_units": 128, "dense_dropout": 0.0,
          "augment_flip": True, "augment_translate": 1, "augment_cutout": 3,
          "optimizer": "nesterov", "learning_rate": 0.05, "batch_size": 64, "schedule": "onecycle", "warmup": 0.25,
          "label_smoothing": 0.2, "weight_decay": 0.0005, "momentum": 0.9}
AUGMENT_KEYS = ("augment_flip", "augment_translate", "augment_cutout")


@pytest.fixture
def modern_space(tmp_path):
    path = tmp_path / "modern.yaml"
    path.write_text(MODERN_SPACE)
    return load_space(path)


def test_older_spaces_have_none_of_the_new_params():
    space = load_space(ROOT / "search_spaces" / "seed.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        params = space.sample(trial)
        assert not NEW_PARAMS & set(params) and not any(k.endswith("_residual") for k in params), params
        study.tell(trial, 0.0)
    # a configuration that leaves the new keys out builds the model it built before them
    plain = {k: v for k, v in MODERN.items() if k not in NEW_PARAMS and not k.endswith("_residual")}
    kinds = [type(layer).__name__ for layer in build_model(plain, (8, 8, 1), 10).layers]
    assert "Flatten" in kinds and not {"Add", "GlobalAveragePooling2D", "RandomFlip"} & set(kinds)


def test_new_keys_sample_validate_and_round_trip_through_a_warm_start_file(modern_space, tmp_path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    seen = {}
    for _ in range(12):
        trial = study.ask()
        params = modern_space.sample(trial)
        assert NEW_PARAMS <= set(params) and modern_space.violations(params) == []
        assert set(trial.params) <= set(params)
        for key in NEW_PARAMS:
            seen.setdefault(key, set()).add(params[key])
        study.tell(trial, 0.0)
    assert seen["schedule"] == {"constant", "cosine", "onecycle"} and seen["head"] == {"flatten", "global_avg"}
    warm = tmp_path / "warm.yaml"
    warm.write_text(yaml.safe_dump({"search_space": modern_space.path, "configurations": {"modern": MODERN}}))
    _, configs = load_configurations(warm)
    assert configs["modern"] == MODERN
    # left out, momentum and weight decay take the builder's defaults for the optimizer
    short = {k: v for k, v in MODERN.items() if k not in ("momentum", "weight_decay")}
    assert modern_space.complete(short)["momentum"] == 0.9 and modern_space.complete(short)["weight_decay"] == 0.0
    assert modern_space.complete({**short, "optimizer": "sgd"})["momentum"] == 0.0


def test_dry_run_shows_the_new_keys_and_their_layers(modern_space, settings, digits, tmp_path, capsys):
    warm = tmp_path / "warm.yaml"
    warm.write_text(yaml.safe_dump({"search_space": modern_space.path, "configurations": {"modern": MODERN}}))
    counts = dry_run(modern_space, digits, settings.replace(warm_start=str(warm), samples=2))
    out = capsys.readouterr().out
    assert len(counts) == 3 and counts[0] == build_model(MODERN, (8, 8, 1), 10).count_params()
    first = out.split("sample 1")[0]
    for text in ("augment_flip=True", "augment_cutout=3", "head=global_avg", "schedule=onecycle", "label_smoothing=0.2",
                 "conv2_residual=True", "(RandomFlip)", "(Translate)", "(Cutout)", "(Add)",
                 "(GlobalAveragePooling2D)"):
        assert text in first, text


def test_every_new_key_trains_on_digits_and_logs_accuracy(digits):
    split = validation_splits(digits.x_train, digits.y_train, 1, 0.2, 0)[0]
    keep = KeepModel()
    metrics = train({**MODERN, "batch_size": 32}, split, digits.input_shape, digits.n_classes, epochs=2, callbacks=[keep])
    assert metrics["epochs_run"] == 2 and np.isfinite(metrics["train_loss"])
    assert metrics["val_accuracy"] > 0.3, metrics  # learns: chance is 0.1
    model = keep.model
    assert isinstance(model.loss, SmoothedSparseCrossentropy) and model.loss.label_smoothing == 0.2
    opt = model.optimizer
    assert opt.nesterov and float(opt.momentum) == 0.9 and opt.weight_decay == 0.0005
    # the one-cycle rate spans the epoch cap: it has reached 0 exactly at the end of the run
    steps = 2 * math.ceil(len(split.train_rows) / 32)
    assert int(opt.iterations) == steps and float(opt.learning_rate) == 0.0
    opt.iterations.assign(steps // 4)
    assert float(opt.learning_rate) == pytest.approx(0.05)


def test_residual_blocks_project_only_where_the_width_changes():
    model = build_model(MODERN, (32, 32, 3), 10)
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 2
    one_by_one = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (1, 1)]
    assert len(one_by_one) == 2  # 3 -> 8 and 8 -> 16 channels
    same = build_model({**MODERN, "conv2_filters": 8}, (32, 32, 3), 10)
    assert len([la for la in same.layers if isinstance(la, keras.layers.Conv2D) and la.kernel_size == (1, 1)]) == 1
    head = build_model(MODERN, (32, 32, 3), 10).get_layer("probabilities")
    assert head.kernel.shape == (16, 10)  # global average: one input per channel


@pytest.mark.parametrize("shape, warmup, total, expected", [
    ("cosine", 0.2, 10, {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 10: 0.0, 12: 0.0}),
    ("onecycle", 0.25, 8, {0: 0.0, 1: 0.5, 2: 1.0, 5: 0.5, 8: 0.0}),
    ("cosine", 0.0, 10, {0: 1.0, 5: 0.5, 10: 0.0}),
])
def test_a_schedule_sets_the_optimizers_rate_as_documented(shape, warmup, total, expected):
    params = {**MODERN, "schedule": shape, "warmup": warmup, "learning_rate": 0.1}
    optimizer = build_model(params, (8, 8, 1), 10, total_steps=total).optimizer
    for step, share in expected.items():
        optimizer.iterations.assign(step)
        assert float(optimizer.learning_rate) == pytest.approx(0.1 * share, abs=1e-7), (step, share)
    constant = build_model({**params, "schedule": "constant"}, (8, 8, 1), 10, total_steps=total).optimizer
    constant.iterations.assign(5)
    assert float(constant.learning_rate) == pytest.approx(0.1)


def test_label_smoothing_loss_matches_its_formula():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "float32")
    labels = np.array([0, 1])
    target = np.full((2, 3), 0.2 / 3) + 0.8 * np.eye(3)[labels]
    expected = -(target * np.log(probabilities)).sum(axis=1).mean()
    assert float(SmoothedSparseCrossentropy(0.2)(labels, probabilities)) == pytest.approx(expected, rel=1e-5)
    assert float(SmoothedSparseCrossentropy(0.0)(labels, probabilities)) == pytest.approx(
        float(keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)), rel=1e-5)


def test_optimizer_defaults_and_weight_decay():
    plain = {k: v for k, v in MODERN.items() if k not in ("momentum", "weight_decay")}

    def opt(**params):
        return build_model({**plain, **params}, (8, 8, 1), 10).optimizer

    assert float(opt(optimizer="sgd").momentum) == 0.0 and not opt(optimizer="sgd").nesterov
    assert float(opt().momentum) == 0.9 and opt().nesterov and opt().weight_decay is None  # nesterov
    assert float(opt(optimizer="sgd", momentum=0.5).momentum) == 0.5
    assert opt(optimizer="adamw").weight_decay == 0.004 and opt(optimizer="adamw", weight_decay=0.0).weight_decay == 0.0
    assert opt(optimizer="adam", weight_decay=0.01).weight_decay == 0.01


def test_augmentation_acts_in_training_only_and_the_model_predicts_as_without_it(digits):
    x = digits.x_train[:64]
    model = build_model(MODERN, (8, 8, 1), 10)
    plain = build_model({k: v for k, v in MODERN.items() if k not in AUGMENT_KEYS}, (8, 8, 1), 10)
    augment = keras.Model(model.input, model.get_layer(index=4).output)  # pixels, rescaling, flip, translate, cutout
    assert [type(la).__name__ for la in model.layers[2:5]] == ["RandomFlip", "Translate", "Cutout"]
    scaled = np.asarray(model.layers[1](x))  # rescaled pixels
    np.testing.assert_array_equal(np.asarray(augment(x, training=False)), scaled)
    trained = np.asarray(augment(x, training=True))
    assert not np.array_equal(trained, scaled)
    # integer-pixel translation and a zeroed square: every pixel is an input pixel or 0
    assert np.isin(trained, np.append(np.unique(scaled), 0.0)).all()
    plain.set_weights(model.get_weights())
    once = model.predict(x, verbose=0)
    np.testing.assert_array_equal(once, model.predict(x, verbose=0))
    np.testing.assert_array_equal(once, plain.predict(x, verbose=0))


def test_translate_shifts_whole_pixels_with_zeros_in_and_compiles():
    from keras.src.trainers.trainer import model_supports_jit

    from pipeline.model import Translate

    image = np.arange(1, 65, dtype="float32").reshape(1, 8, 8, 1)
    shifted = np.asarray(Translate(2, seed=3)(np.repeat(image, 64, axis=0), training=True))[..., 0]
    seen = set()
    for out in shifted:
        (r, c), value = np.argwhere(out > 0)[0], out[out > 0][0]
        dy, dx = r - (value - 1) // 8, c - (value - 1) % 8  # where the first kept pixel came from
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        np.testing.assert_array_equal(out, np.roll(image[0, ..., 0], (dy, dx), axis=(0, 1)) * (out > 0))
        assert (out > 0).sum() == (8 - abs(dy)) * (8 - abs(dx))  # zeros shifted in, nothing wrapped
        seen.add((int(dy), int(dx)))
    assert len(seen) > 10  # the shifts vary from image to image
    assert model_supports_jit(build_model(MODERN, (8, 8, 1), 10))  # no layer keeps XLA (JAX's jit) off


def test_cutout_zeroes_one_square_per_image():
    from pipeline.model import Cutout

    ones = np.ones((32, 10, 10, 1), "float32")
    holes = 1 - np.asarray(Cutout(4, seed=1)(ones, training=True))
    sizes = holes.reshape(32, -1).sum(axis=1)
    assert sizes.max() == 16 and sizes.min() >= 4  # a full 4x4 square, clipped at a corner at worst
    rows, cols = holes.any(axis=2)[..., 0], holes.any(axis=1)[..., 0]
    assert (sizes == rows.sum(axis=1) * cols.sum(axis=1)).all()  # a rectangle, not scattered pixels


def test_saved_model_loads_in_a_fresh_process_and_through_the_pyfunc(tmp_path, digits):
    """Also, in that TensorFlow process: an installed JAX stays out (tf.lite imports it whenever
    it is installed: about 1 s and 100 MB a process for nothing; pipeline.device)."""
    model = build_model(MODERN, (8, 8, 1), 10, total_steps=10)
    path = tmp_path / "model.keras"
    model.save(path)
    x = digits.x_train[:8]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "p.npy", model.predict(x, verbose=0))
    (tmp_path / "class_names.json").write_text(json.dumps({"class_names": [str(i) for i in range(10)]}))
    # a fresh process: the serving pyfunc registers the custom layers itself; then plain Keras
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pipeline.device import use_backend
use_backend("tensorflow")
import numpy as np, keras
from pipeline.serving import ClassNameModel
x, p = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'p.npy')!r})
served = ClassNameModel()
assert "pipeline.model" not in sys.modules
artifacts = {{"keras_model": {str(path)!r}, "class_names": {str(tmp_path / 'class_names.json')!r}}}
served.load_context(type("Context", (), {{"artifacts": artifacts}})())
frame = served.predict(None, x)
np.testing.assert_allclose(frame[[f"p_{{i}}" for i in range(10)]].to_numpy(), p, rtol=1e-6)
import pipeline.model
model = keras.saving.load_model({str(path)!r})
np.testing.assert_array_equal(model.predict(x, verbose=0), p)
model.optimizer.iterations.assign(5)  # one-cycle over 10 steps, warm-up 0.25: 2/3 of the peak
assert abs(float(model.optimizer.learning_rate) - 0.05 * 2 / 3) < 1e-7 and model.loss.label_smoothing == 0.2
from pipeline.train import train
assert keras.backend.backend() == "tensorflow" and sys.modules.get("jax", "absent") is None, "JAX kept out"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_warmup_decay_survives_serialization():
    schedule = WarmupDecay(0.2, 40, 0.25, "onecycle")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert [float(again(s)) for s in (5, 10, 25)] == pytest.approx([float(schedule(s)) for s in (5, 10, 25)])


def test_block_sections_override_later_blocks_for_their_block_only(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("depth: 3\nfirst_block: {filters: 8, kernel_size: 3, pool_size: 2}\n"
                    "later_blocks: {filters: [16, 32], kernel_size: [3, 5], pool_size: 2}\nblock3: {filters: 64}\n")
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        params = space.sample(study.ask())
        assert params["conv2_filters"] in (16, 32) and params["conv3_filters"] == 64
        assert params["conv3_kernel_size"] in (3, 5)  # the rest of block 3 follows later_blocks
        assert space.violations(params) == []
    assert space.violations({**params, "conv3_filters": 32}) == ["conv3_filters=32 is outside the space"]


def test_the_recipe_starts_from_its_measured_configuration():
    space = load_space(ROOT / "search_spaces" / "cifar10.yaml")
    start = load_configurations(ROOT / "search_spaces" / "cifar10_start.yaml", space, [])[1]["resnet_small_lr01"]
    assert [start[f"conv{i}_filters"] for i in (1, 2, 3)] == [32, 64, 128]
    assert all(start[f"conv{i}_convs"] == 2 and start[f"conv{i}_residual"] for i in (1, 2, 3))


def test_refit_epochs_sets_the_refits_length_and_the_phases_are_timed(settings, digits, capsys):
    from pipeline.cli import run

    metrics = run("main", settings.replace(n_trials=1, epochs=1, refit_epochs=3), data=digits)
    assert metrics["refit_epochs"] == 3
    assert "refit epoch 3/3:" in capsys.readouterr().out
    for phase in ("search_seconds", "refit_seconds", "test_seconds", "logging_seconds"):
        assert metrics[phase] > 0

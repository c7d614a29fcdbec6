"""Issue 20, item 1: the fast-CIFAR-10 techniques (airbench, Page's ResNet-9) as space keys.
Each key validates with a one-line error naming file and key, is absent from the params of
spaces that do not name it (today's models unchanged), builds, fits one epoch of tiny real
data, shows in the dry run, and survives a keras.saving round trip; and does what it says."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import optuna
import pytest
import yaml
from conftest import ROOT

from pipeline.dry_run import dry_run
from pipeline.errors import PipelineError
from pipeline.model import (BoostedBatchNorm, Dirac, Whitening, build_model, for_serving, inference_batch, latency_ms,
                            set_whitening, whitening_filters, with_tta)
from pipeline.space import load_space
from pipeline.train import (AlternatingFlips, Images, KeepModel, RowBatches, WeightAverage, fit_full, train,
                            validation_splits)
from pipeline.warm_start import load_configurations

SHAPE, CLASSES = (16, 16, 3), 4
# two batch-normed blocks (two convs, then one) and one hidden dense layer, for tiny 16x16 colour images
BASE = {"depth": 2,
        "conv1_filters": 8, "conv1_kernel_size": 3, "conv1_pool_size": 2, "conv1_convs": 2, "conv1_batch_norm": True,
        "conv1_pooling": "max", "conv1_dropout": 0.0,
        "conv2_filters": 16, "conv2_kernel_size": 3, "conv2_pool_size": 2, "conv2_convs": 1, "conv2_batch_norm": True,
        "conv2_pooling": "max", "conv2_dropout": 0.0,
        "dense_layers": 1, "dense_units": 16, "dense_dropout": 0.0,
        "optimizer": "nesterov", "learning_rate": 0.05, "batch_size": 32}
# every key of this file switched on
NEW = {"activation": "gelu", "head": "global_max", "head_scale": 0.125, "bn_scale": False, "bn_momentum": 0.6,
       "bn_bias_lr": 16.0, "block_order": "conv_pool_bn_act", "conv_init": "dirac", "pool_padding": "valid",
       "whiten": True, "whiten_kernel": 2, "tta": "flip_shift", "weight_average": "ema",
       "augment_flip": "alternating"}
NEW_PARAMS = set(NEW) - {"head", "augment_flip"}  # params no space had (head, augment_flip had other values)
NEW_TOP = {k: v for k, v in NEW.items() if k != "augment_flip"}  # the top-level settings
BLOCKS = """
depth: 2
first_block: {filters: 8, kernel_size: 3, pool_size: 2, batch_norm: true, convs: 2}
later_blocks: {filters: 16, kernel_size: 3, pool_size: 2, batch_norm: true}
"""
TRAINING = """
dense: {units: 16}
training: {optimizer: nesterov, learning_rate: 0.05, batch_size: 32}
"""
ALL_SPACE = BLOCKS + TRAINING + yaml.safe_dump(NEW_TOP) + "augment: {flip: alternating}\n"  # every key fixed on
SPACE = BLOCKS + TRAINING + """
activation: [relu, gelu]
head: [flatten, global_max]
head_scale: {low: 0.05, high: 0.2}
bn_scale: [true, false]
bn_momentum: {low: 0.4, high: 0.9}
bn_bias_lr: [1.0, 64.0]
block_order: [conv_bn_act, conv_pool_bn_act]
conv_init: [default, dirac]
pool_padding: [same, valid]
whiten: [false, true]
whiten_kernel: [2, 3]
tta: [none, flip, flip_shift]
weight_average: [none, ema, lookahead]
augment: {flip: [false, true, alternating]}
"""
GOOD = """
depth: 1
first_block: {filters: 8, kernel_size: 3, pool_size: 2}
"""


@pytest.fixture(scope="module")
def tiny():
    """64 random uint8 16x16 colour images, 4 classes."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (64, *SHAPE), dtype=np.uint8), np.arange(64) % CLASSES


def fitted(params: dict, tiny) -> keras.Model:
    """The model of `params` after one epoch on the tiny images."""
    keras.utils.set_random_seed(0)
    model = build_model(params, SHAPE, CLASSES)
    set_whitening(model, tiny[0])  # as pipeline.train does
    history = model.fit(*tiny, epochs=1, batch_size=32, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    return model


def space_file(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, fragment", [
    (GOOD + "activation: tanh\n", "key 'activation': 'tanh' must be one of ('relu', 'gelu')"),
    (GOOD + "activation: [relu, 3]\n", "key 'activation': expected str, got 3"),
    (GOOD + "head: global_min\n", "key 'head': 'global_min' must be one of ('flatten', 'global_avg', 'global_max')"),
    (GOOD + "head_scale: 0\n", "key 'head_scale': 0 must be > 0"),
    (GOOD + "head_scale: ninth\n", "key 'head_scale': expected float, got 'ninth'"),
    (GOOD + "bn_scale: 1\n", "key 'bn_scale': expected bool, got 1"),
    (GOOD + "bn_momentum: 1.0\n", "key 'bn_momentum': 1.0 must be in [0, 1)"),
    (GOOD + "bn_bias_lr: [1, -64]\n", "key 'bn_bias_lr': -64 must be > 0"),
    (GOOD + "block_order: conv_act_bn\n", "key 'block_order': 'conv_act_bn' must be one of ('conv_bn_act', "
                                            "'conv_pool_bn_act')"),
    (GOOD + "conv_init: he\n", "key 'conv_init': 'he' must be one of ('default', 'dirac')"),
    (GOOD + "pool_padding: floor\n", "key 'pool_padding': 'floor' must be one of ('same', 'valid')"),
    (GOOD + "whiten: [true, 0]\n", "key 'whiten': expected bool, got 0"),
    (GOOD + "whiten_kernel: 0\n", "key 'whiten_kernel': 0 must be >= 1"),
    (GOOD + "tta: mirror\n", "key 'tta': 'mirror' must be one of ('none', 'flip', 'flip_shift')"),
    (GOOD + "weight_average: swa\n", "key 'weight_average': 'swa' must be one of ('none', 'ema', 'lookahead')"),
    (GOOD + "augment: {flip: sometimes}\n", "key 'augment.flip': 'sometimes' must be true, false or 'alternating'"),
    (GOOD + "augment: {flip: [true, 2]}\n", "key 'augment.flip': expected bool or str, got 2"),
])
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path, text, fragment):
    path = space_file(tmp_path, text)
    with pytest.raises(PipelineError) as error:
        load_space(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


def test_spaces_that_do_not_name_the_keys_have_none_of_their_params():
    for name in ("seed", "wide", "modern", "cifar10"):
        space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(5):
            trial = study.ask()
            params = space.sample(trial)
            assert not NEW_PARAMS & set(params) and params.get("head") != "global_max", name
            assert params.get("augment_flip") in (None, True, False), name
            study.tell(trial, 0.0)
        assert not NEW_PARAMS & set(space.complete({"depth": 1})), name


def test_a_space_samples_the_keys_and_completes_them_with_the_builders_defaults(tmp_path):
    space = load_space(space_file(tmp_path, SPACE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen, flips = set(), set()
    for _ in range(12):
        trial = study.ask()
        params = space.sample(trial)
        assert space.violations(params) == [] and set(NEW) <= set(params)
        seen.update((params["activation"], params["head"], params["block_order"], params["conv_init"]))
        flips.add(params["augment_flip"])
        study.tell(trial, 0.0)
    assert seen == {"relu", "gelu", "flatten", "global_max", "conv_bn_act", "conv_pool_bn_act", "default", "dirac"}
    assert flips == {False, True, "alternating"}
    short = {k: v for k, v in BASE.items() if k not in ("dense_layers", "dense_dropout")}
    assert space.complete(short)["activation"] == "relu" and space.complete(short)["head"] == "flatten"
    full = space.complete(short)
    keys = ("head_scale", "bn_scale", "bn_momentum", "bn_bias_lr", "block_order", "conv_init", "pool_padding", "whiten",
            "whiten_kernel", "augment_flip")
    assert [full[k] for k in keys] == [1 / 9, True, 0.9, 1.0, "conv_bn_act", "default", "same", False, 2, False]


def test_a_configuration_with_every_key_is_a_valid_warm_start_and_baseline(tmp_path):
    path = space_file(tmp_path, ALL_SPACE)
    space = load_space(path)
    warm = tmp_path / "warm.yaml"
    config = {k: v for k, v in {**BASE, **NEW}.items() if not k.endswith(("_pooling", "_dropout"))}  # defaults
    warm.write_text(yaml.safe_dump({"search_space": str(path), "configurations": {"airbench_like": config}}))
    _, configs = load_configurations(warm)  # what warm starts and baselines read: completed, validated
    assert {k: configs["airbench_like"][k] for k in NEW} == NEW and space.violations(configs["airbench_like"]) == []
    warm.write_text(yaml.safe_dump({"search_space": str(path), "configurations": {"x": {**config, "bn_momentum": 0.5}}}))
    with pytest.raises(PipelineError, match="bn_momentum=0.5 is outside the space"):
        load_configurations(warm)


def test_a_model_with_every_key_compiles_with_xla_on_tensorflow(tiny):
    model = build_model({**BASE, **NEW}, SHAPE, CLASSES)
    set_whitening(model, tiny[0])
    model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], jit_compile=True)
    assert model.jit_compile and np.isfinite(model.fit(*tiny, epochs=1, batch_size=32, verbose=0).history["loss"][0])


def test_defaults_build_todays_model():
    today = build_model(BASE, SHAPE, CLASSES)
    explicit = build_model({**BASE, "activation": "relu"}, SHAPE, CLASSES)
    assert [layer.get_config() | {"name": ""} for layer in today.layers] == [
        layer.get_config() | {"name": ""} for layer in explicit.layers]


def test_gelu_is_the_activation_of_every_conv_and_hidden_dense_layer(tiny):
    model = fitted({**BASE, "activation": "gelu"}, tiny)
    acts = [layer.get_config()["activation"] for layer in model.layers
            if isinstance(layer, (keras.layers.Activation, keras.layers.Dense)) and layer.name != "probabilities"]
    assert acts == ["gelu"] * 4, acts  # after each of the three convs, and the hidden dense layer


def test_the_dry_run_shows_every_key(tmp_path, settings, digits, capsys):
    space = load_space(space_file(tmp_path, ALL_SPACE))
    dry_run(space, digits, settings.replace(samples=1))
    out = capsys.readouterr().out
    for key, value in NEW.items():
        assert f" {key}={value}" in out, key


def test_a_model_with_every_key_saved_and_loaded_predicts_the_same(tiny, tmp_path):
    model = fitted({**BASE, **NEW}, tiny)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    stem = model.get_layer("whitening").kernel
    np.testing.assert_array_equal(loaded.get_layer("whitening").kernel, stem)  # the fitted filters were saved
    assert np.abs(keras.ops.convert_to_numpy(stem)).max() > 1
    np.testing.assert_allclose(loaded.predict(tiny[0], verbose=0), model.predict(tiny[0], verbose=0), atol=1e-6)


def optimizer_entries(path) -> list[str]:
    """The names in a saved .keras file's weights that hold optimizer state."""
    import io
    import zipfile

    import h5py

    names = []
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        weights.visit(lambda name: names.append(name) if "optimizer" in name else None)
    return names


def test_the_served_model_saves_the_trained_layers_without_the_optimizer(tiny, tmp_path):
    model = fitted({**BASE, "optimizer": "adam"}, tiny)
    for name, saved in (("trained", model), ("served", for_serving(model)), ("tta", with_tta(for_serving(model), "flip"))):
        saved.save(tmp_path / f"{name}.keras")
    assert optimizer_entries(tmp_path / "trained.keras"), "a trained model saves Adam's state"
    assert not optimizer_entries(tmp_path / "served.keras") and not optimizer_entries(tmp_path / "tta.keras")
    assert (tmp_path / "served.keras").stat().st_size < (tmp_path / "trained.keras").stat().st_size
    loaded = keras.saving.load_model(tmp_path / "served.keras")
    np.testing.assert_allclose(loaded.predict(tiny[0], verbose=0), model.predict(tiny[0], verbose=0), atol=1e-6)


def test_the_global_max_head_is_a_scaled_bias_free_layer_on_max_pooled_features(tiny):
    model = fitted({**BASE, "dense_layers": 0, "head": "global_max", "head_scale": 0.125}, tiny)
    pooled = next(layer for layer in model.layers if isinstance(layer, keras.layers.GlobalMaxPooling2D))
    logits = model.get_layer("logits")
    assert not logits.use_bias and [w.shape for w in logits.weights] == [(16, CLASSES)]
    features = keras.Model(model.inputs, pooled.output).predict(tiny[0], verbose=0)
    assert features.shape == (64, 16)
    expected = keras.ops.convert_to_numpy(keras.activations.softmax(0.125 * features @ logits.get_weights()[0]))
    np.testing.assert_allclose(model.predict(tiny[0], verbose=0), expected, rtol=1e-4, atol=1e-6)
    default = build_model({**BASE, "head": "global_max"}, SHAPE, CLASSES)
    assert default.get_layer("logit_scale").scale == pytest.approx(1 / 9)


def batch_norms(model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_bn_scale_false_has_no_gamma_and_bn_momentum_sets_every_bn(tiny):
    model = fitted({**BASE, "bn_scale": False, "bn_momentum": 0.6, "conv1_residual": True}, tiny)
    norms = batch_norms(model)
    assert len(norms) == 4  # three convs and the residual's 1x1 projection
    for layer in norms:
        assert layer.gamma is None and layer.momentum == 0.6
        assert sorted(w.path.split("/")[-1] for w in layer.weights) == ["beta", "moving_mean", "moving_variance"]
    assert all(layer.gamma is not None and layer.momentum == 0.9 for layer in batch_norms(build_model(BASE, SHAPE, 4)))


def offsets(model) -> np.ndarray:
    """The first batch norm's effective offset."""
    layer = batch_norms(model)[0]
    if isinstance(layer, BoostedBatchNorm):
        return np.sqrt(layer.bias_lr) * keras.ops.convert_to_numpy(layer.raw_beta)
    return keras.ops.convert_to_numpy(layer.beta)


@pytest.mark.parametrize("optimizer, factor", [("sgd", 16.0), ("adam", 4.0)])
def test_bn_bias_lr_multiplies_the_offsets_step(tiny, optimizer, factor):
    """One step from the same weights: under SGD the offset moves bias_lr (16) times as far
    as without the boost; under Adam, whose first step is lr x sign(gradient), sqrt(16) = 4 times."""
    x, y = tiny
    steps, kernels = [], []
    for bias_lr in (1.0, 16.0):
        keras.utils.set_random_seed(0)
        model = build_model({**BASE, "optimizer": optimizer, "learning_rate": 0.01, "bn_bias_lr": bias_lr}, SHAPE, 4)
        kernels.append([keras.ops.convert_to_numpy(layer.kernel) for layer in model.layers if hasattr(layer, "kernel")])
        model.train_on_batch(x[:32], y[:32])
        steps.append(offsets(model))
    assert isinstance(batch_norms(model)[0], BoostedBatchNorm)
    np.testing.assert_allclose(steps[1], factor * steps[0], rtol=1e-3, atol=1e-7)
    assert np.abs(steps[0]).max() > 1e-4
    assert all(np.array_equal(a, b) for a, b in zip(*kernels))  # both started from the same weights


def test_block_order_conv_pool_bn_act_pools_after_each_blocks_first_conv(tiny):
    model = fitted({**BASE, "block_order": "conv_pool_bn_act", "conv1_residual": True}, tiny)
    kinds = [type(layer).__name__ for layer in model.layers][2:-3]  # between Rescaling and the head
    assert kinds == ["Conv2D", "MaxPooling2D", "BatchNormalization", "Activation",
                     "Conv2D", "BatchNormalization", "Activation", "Add",  # the first stage's output added
                     "Conv2D", "MaxPooling2D", "BatchNormalization", "Activation"], kinds
    assert model.layers[-4].output.shape == (None, 4, 4, 16)  # each block halved the side once, as today
    today = [type(layer).__name__ for layer in build_model(BASE, SHAPE, 4).layers][2:-3]
    assert today == ["Conv2D", "BatchNormalization", "Activation", "Conv2D", "BatchNormalization", "Activation",
                     "MaxPooling2D", "Conv2D", "BatchNormalization", "Activation", "MaxPooling2D"], today


def test_pool_padding_valid_floors_each_pooled_side_where_the_pool_fits():
    params = {**BASE, "whiten": True, "block_order": "conv_pool_bn_act"}

    def pooled_sides(p, shape):
        return [layer.output.shape[1] for layer in build_model(p, shape, 4).layers
                if isinstance(layer, keras.layers.MaxPooling2D)]

    assert pooled_sides(params, SHAPE) == [8, 4]  # the stem's 15 pixels: ceil(15 / 2), then 4
    assert pooled_sides({**params, "pool_padding": "valid"}, SHAPE) == [7, 3]  # floor, as PyTorch's and airbench's
    assert pooled_sides({**params, "pool_padding": "valid"}, (4, 4, 3)) == [1, 1]  # 3 -> 1; then 1 < 2 stays "same"


@pytest.mark.parametrize("size, inputs, filters", [(3, 4, 6), (3, 6, 4), (2, 3, 5), (1, 8, 16)])
def test_a_dirac_conv_passes_its_first_channels_through_and_the_rest_is_glorot(size, inputs, filters):
    kernel = keras.ops.convert_to_numpy(Dirac(seed=1)((size, size, inputs, filters)))
    n, centre = min(inputs, filters), (size - 1) // 2
    expected = np.zeros((size, size, inputs, n))
    expected[centre, centre, range(n), range(n)] = 1
    np.testing.assert_array_equal(kernel[..., :n], expected)
    limit = np.sqrt(6 / (size * size * (inputs + filters)))  # Glorot-uniform's bound on the rest
    if filters > inputs:
        assert 0 < np.abs(kernel[..., n:]).max() <= limit
    conv = keras.layers.Conv2D(filters, size, padding="same", use_bias=False, kernel_initializer=Dirac())
    x = np.random.default_rng(0).normal(size=(2, 7, 7, inputs)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(conv(x))[..., :n], x[..., :n], atol=1e-6)


def test_conv_init_dirac_initialises_every_block_conv(tiny):
    model = build_model({**BASE, "conv_init": "dirac", "conv1_residual": True}, SHAPE, CLASSES)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 4 and all(isinstance(c.kernel_initializer, Dirac) for c in convs)
    first = keras.ops.convert_to_numpy(convs[0].kernel)  # 3 input channels, 8 filters
    assert first[1, 1, range(3), range(3)].tolist() == [1, 1, 1] and first[..., :3].sum() == 3
    assert not any(isinstance(c.kernel_initializer, Dirac) for c in build_model(BASE, SHAPE, CLASSES).layers
                   if isinstance(c, keras.layers.Conv2D))


def correlated_images(n: int, seed: int) -> np.ndarray:
    """uint8 16x16 colour images whose neighbouring pixels and channels are strongly
    correlated (4x4 blocks of one value, a shared grey level) plus some independent noise."""
    rng = np.random.default_rng(seed)
    blocks = np.repeat(np.repeat(rng.uniform(0, 150, (n, 4, 4, 1)), 4, axis=1), 4, axis=2)
    colour = rng.uniform(0, 50, (n, 1, 1, 3))
    return (blocks + colour + rng.uniform(0, 55, (n, 16, 16, 3))).astype(np.uint8)


def patches(images: np.ndarray, k: int) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(images / 255, (k, k), axis=(1, 2))
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * images.shape[-1])


@pytest.mark.parametrize("k", [2, 3])
def test_the_whitening_stem_whitens_its_training_patches(k):
    x = correlated_images(64, 0)
    d = k * k * 3
    assert np.abs(np.corrcoef(patches(x, k).T) - np.eye(d)).max() > 0.5  # far from white before
    stem = Whitening(k)
    stem.build((None, *SHAPE))
    kernel, bias = whitening_filters(x, k)
    assert kernel.shape == (k, k, 3, 2 * d) and bias.shape == (2 * d,)
    stem.kernel.assign(kernel)
    stem.bias.assign(bias)
    out = keras.ops.convert_to_numpy(stem(x.astype("float32") / 255))
    assert out.shape == (64, 17 - k, 17 - k, 2 * d)
    out = out.reshape(-1, 2 * d)
    np.testing.assert_allclose(np.cov(out[:, :d].T, bias=True), np.eye(d), atol=0.02)
    np.testing.assert_allclose(out[:, :d].mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(out[:, d:], -out[:, :d], atol=1e-5)  # the negatives
    assert stem.trainable_weights == [stem.bias] and stem.non_trainable_weights == [stem.kernel]


def test_the_whitening_filters_do_not_depend_on_how_many_images_are_summed_at_once():
    """The patch sums run in chunks that bound their memory (`chunk_mb`; 0: one image at a
    time): any chunking gives the filters of one chunk, up to each eigenvector's sign."""
    x = correlated_images(64, 3)
    (one_kernel, one_bias), (kernel, bias) = whitening_filters(x, 2, chunk_mb=64), whitening_filters(x, 2, chunk_mb=0)
    d = 12
    one, each = one_kernel.reshape(d, 2 * d), kernel.reshape(d, 2 * d)
    signs = np.sign((one[:, :d] * each[:, :d]).sum(0))  # an eigenvector and its negative are one filter pair
    np.testing.assert_allclose(each[:, :d] * signs, one[:, :d], atol=1e-4)
    np.testing.assert_allclose(np.sort(bias), np.sort(one_bias), atol=1e-4)


def test_the_whitening_filters_come_from_the_trials_training_rows_only():
    x, y = correlated_images(80, 1), np.arange(80) % CLASSES
    split = validation_splits(x, y, 1, 0.25, 0)[0]
    params = {**BASE, "whiten": True, "dense_layers": 0}
    stems = []
    for val_images in (x[split.val_rows], correlated_images(20, 2)):  # other validation rows, same training rows
        changed = x.copy()
        changed[split.val_rows] = val_images
        keep = KeepModel()
        other = validation_splits(changed, y, 1, 0.25, 0)[0]
        assert np.array_equal(other.train_rows, split.train_rows)
        train(params, other, SHAPE, CLASSES, epochs=1, callbacks=[keep])
        stems.append(keras.ops.convert_to_numpy(keep.model.get_layer("whitening").kernel))
    np.testing.assert_array_equal(stems[0], stems[1])  # frozen: training left them as they were fitted
    np.testing.assert_allclose(stems[0], whitening_filters(x[split.train_rows], 2)[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(stems[0], whitening_filters(x, 2)[0], atol=1e-3)  # all rows would give others


@pytest.mark.parametrize("reader", ["pipeline", "numpy"])
def test_alternating_flips_flip_a_random_half_then_every_image_every_other_epoch(tiny, reader):
    """The batches a fit reads (tf.data on TensorFlow; RowBatches, the JAX and PyTorch path)."""
    x, y = tiny
    rows = np.arange(8, 56)
    flips = AlternatingFlips(len(x), seed=3)
    if reader == "numpy":
        batches = RowBatches(x, y, rows, 16, False, 0, flips)
        read = lambda: [batches[i] for i in range(len(batches))]  # noqa: E731
    else:
        batches = Images(x, y).batches(rows, 16, flips=flips)
        read = lambda: list(batches)  # noqa: E731
    flipped = []
    for epoch in range(4):
        flips.on_epoch_begin(epoch)
        images = np.concatenate([np.asarray(b[0]) for b in read()])
        labels = np.concatenate([np.asarray(b[1]) for b in read()])
        assert labels.tolist() == y[rows].tolist()
        mirrored = np.array([np.array_equal(image, x[r][:, ::-1]) for image, r in zip(images, rows)])
        assert all(np.array_equal(image, x[r]) for image, r in zip(images[~mirrored], rows[~mirrored]))
        flipped.append(mirrored)
    assert 0.25 < flipped[0].mean() < 0.75  # epoch 0: a random half
    assert (flipped[1] == ~flipped[0]).all() and (flipped[2] == flipped[0]).all() and (flipped[3] == flipped[1]).all()


def test_alternating_flips_are_the_datas_not_a_layer_and_train_fits_with_them(tiny):
    kinds = lambda flip: {type(layer).__name__ for layer in build_model({**BASE, "augment_flip": flip}, SHAPE, 4).layers}  # noqa: E731
    assert "RandomFlip" in kinds(True) and "RandomFlip" not in kinds("alternating")
    split = validation_splits(*tiny, 1, 0.25, 0)[0]
    metrics = train({**BASE, "augment_flip": "alternating"}, split, SHAPE, CLASSES, epochs=2)
    assert metrics["epochs_run"] == 2 and np.isfinite(metrics["train_loss"])


def test_every_key_trains_under_mixed_float16_with_float32_logits(tiny):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = fitted({**BASE, **NEW}, tiny)
        assert model.get_layer("whitening").compute_dtype == "float16"
        assert {layer.compute_dtype for layer in batch_norms(model)} == {"float16"}
        assert [model.get_layer(name).compute_dtype for name in ("logits", "logit_scale", "probabilities")] == [
            "float32"] * 3
        assert model.outputs[0].dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _shifted(x: np.ndarray, shift: int) -> np.ndarray:
    """numpy: `x` shifted `shift` pixels down and right, the border reflected in."""
    s = abs(shift)
    padded = np.pad(x, [(0, 0), (s, s), (s, s), (0, 0)], mode="reflect")
    start = s - shift
    return padded[:, start:start + x.shape[1], start:start + x.shape[2]]


def test_tta_averages_the_models_probabilities_over_its_views_and_saves_with_them(tiny, tmp_path):
    x = tiny[0][:8]
    model = fitted(BASE, tiny)
    assert with_tta(model, "none") is model
    p = lambda images: model.predict(images, verbose=0)  # noqa: E731
    mirror = x[:, :, ::-1]
    flip = with_tta(model, "flip")
    np.testing.assert_allclose(flip.predict(x, verbose=0), (p(x) + p(mirror)) / 2, atol=1e-6)
    six = with_tta(model, "flip_shift")
    shifted = [v for s in (1, -1) for v in (_shifted(x, s), _shifted(x, s)[:, :, ::-1])]  # airbench: shift, then mirror
    assert not np.array_equal(shifted[0], x)
    expected = (p(x) + p(mirror)) / 4 + sum(p(v) for v in shifted) / 8
    np.testing.assert_allclose(six.predict(x, verbose=0), expected, atol=1e-6)
    assert six.predict(x, verbose=0).sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    six.save(tmp_path / "tta.keras")
    loaded = keras.saving.load_model(tmp_path / "tta.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    assert latency_ms(six, x) > latency_ms(model, x) > 0, "six views cost more than one"


def test_scoring_and_timing_passes_hold_at_most_256_cifar_images_of_pixels():
    """What bounds the refit's memory after its fit: at 64 px a pass of 256 images of the
    photos space's widest net held about 0.5 GB more than one of 64."""
    assert [inference_batch(s) for s in ((8, 8, 1), (32, 32, 3), (64, 64, 3), (1000, 1000, 3))] == [256, 256, 64, 1]
    seen = []
    assert latency_ms(lambda x, training: seen.append((len(x), training)), np.zeros((200, 64, 64, 3), "uint8")) > 0
    assert seen == [(64, False), (64, False), (64, False), (8, False)] * 6, "a warm-up pass and 5 timed ones"


def test_a_refit_with_tta_scores_and_serves_the_averaged_model(tmp_path, settings, digits):
    """The refit scores the TTA model on the test split and registers it: the served model's
    probabilities are the flip-averaged ones, and its `latency_ms` is logged."""
    import mlflow

    from pipeline.cli import run

    space = tmp_path / "tta.yaml"
    space.write_text((ROOT / "search_spaces" / "seed.yaml").read_text() + "\ntta: flip\n")
    s = dataclasses.replace(settings, search_space=str(space), n_trials=2, epochs=1, registered_model_name="tta-model")
    metrics = run("main", s, data=digits)
    assert metrics["test_accuracy"] > 0.3 and metrics["latency_ms"] > 0
    served = mlflow.pyfunc.load_model("models:/tta-model/1")
    x = digits.test.x[:16]
    inner = [layer for layer in served.unwrap_python_model().model.layers if isinstance(layer, keras.Model)]
    assert len(inner) == 1, "the served model holds the trained model inside its views"
    p = lambda images: inner[0].predict(images, verbose=0)  # noqa: E731
    answer = served.predict(x)[[f"p_{c}" for c in digits.class_names]].to_numpy()
    np.testing.assert_allclose(answer, (p(x) + p(x[:, :, ::-1])) / 2, atol=1e-5)


def test_weight_averaging_validates_keeps_and_returns_the_averaged_weights(tiny):
    """`weight_average: ema`: the validation score logged is the kept model's (the averaged
    weights, restored by early stopping), and a fit returns the average, not the last step's
    weights: training steps are the same as without averaging (same seed), the result is not."""
    x, y = tiny
    params = {**BASE, "weight_average": "ema", "batch_size": 8}
    split = validation_splits(x, y, 1, 0.25, 0)[0]
    keep = KeepModel()
    metrics = train(params, split, SHAPE, CLASSES, epochs=3, patience=3, callbacks=[keep])
    accuracy = keep.model.evaluate(x[split.val_rows], y[split.val_rows], verbose=0, return_dict=True)["accuracy"]
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    averaged = fit_full(params, x, y, SHAPE, CLASSES, epochs=2, seed=0)
    last = fit_full({**BASE, "batch_size": 8}, x, y, SHAPE, CLASSES, epochs=2, seed=0)
    for kind in ("kernel", "moving_mean"):  # the weights and batch norm's statistics are averaged
        pairs = [(a, b) for a, b in zip(averaged.weights, last.weights) if kind in a.path]
        assert pairs and any(not np.allclose(a.numpy(), b.numpy()) for a, b in pairs), kind


def test_lookahead_resumes_training_from_the_average(tiny):
    """`weight_average: lookahead` copies the average back into the network at each update, so
    the fit goes elsewhere than `ema`'s (which trains on the current weights) from the same seed,
    while `ema` twice ends in the same place (the difference is the copy, not noise)."""
    x, y = tiny
    fit = lambda kind: fit_full({**BASE, "weight_average": kind, "batch_size": 8}, x, y, SHAPE, CLASSES,  # noqa: E731
                                epochs=2, seed=0).get_weights()  # 16 steps: updates at 5, 10 and 15
    ema, again, ahead = fit("ema"), fit("ema"), fit("lookahead")
    assert all(np.allclose(a, b) for a, b in zip(ema, again))
    assert any(not np.allclose(a, b) for a, b in zip(ema, ahead))


def test_weight_average_the_average_follows_the_schedule():
    """At the fit's end (progress 1) the decay is 0.95^every: every=1 keeps 0.95 of the old
    average and takes 0.05 of the new weights, and the model ends with the average."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    average = WeightAverage(every=1)
    average.set_model(model)
    average.set_params({"steps": 1, "epochs": 1})
    model.set_weights([np.zeros((2, 1))])
    average.on_train_begin()
    model.set_weights([np.ones((2, 1))])
    average.on_train_batch_end(0)  # step 1 of 1: progress 1, decay 0.95
    np.testing.assert_allclose(average.average[0], 0.05 * np.ones((2, 1)), atol=1e-6)
    average.on_train_end()
    np.testing.assert_allclose(model.get_weights()[0], 0.05 * np.ones((2, 1)), atol=1e-6)

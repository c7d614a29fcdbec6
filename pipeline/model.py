"""`build_model(params, input_shape, n_classes, total_steps=None)`: a compiled Keras CNN from a
plain dict.

Knows nothing about Optuna. The model takes raw uint8 pixels and scales them itself, so a
saved model predicts from raw image arrays. Augmentation (`augment_*` params) is layers
inside the model that act only in training (Keras' RandomFlip, `Translate` and `Cutout`
are the identity when `training=False`), so the saved model predicts exactly as one without
them; only alternating flips (`augment_flip: alternating`) are pipeline.train's data instead.
A learning-rate schedule (`schedule`) spans `total_steps` optimizer steps, which only the
caller knows (pipeline.train: epochs x steps per epoch). New code here uses `keras.ops`
only, no TensorFlow calls, so it runs on any Keras backend; the custom layers,
initializer, schedule and loss are registered, so `keras.saving.load_model` reads a saved
model after `import pipeline.model`. `build_model` sees no data: a whitening stem
(`whiten`) is built with placeholder filters, which `set_whitening` then fits to a fit's
training images (pipeline.train calls it before fitting). Convs and pools use "same"
padding, so every configuration builds for any input size (8x8 digits included): a pool
never shrinks a side below 1 (only the whitening stem's k x k conv is "valid", k - 1
pixels narrower; `pool_padding: valid` pools "valid" where a side is at least the pool).
Under Keras' mixed policies (`mixed_bfloat16`, `mixed_float16`: pipeline/device.py) the layers
compute in 16 bits, the output layer (logits and softmax) stays float32, so a saved model
predicts float32 probabilities, and under float16 `compile` adds loss scaling itself. Besides `accuracy`
the model reports `f1_macro` and `balanced_accuracy` each epoch (pipeline.class_metrics).
"""

from __future__ import annotations

import hashlib
import math
import time

import keras
import numpy as np
from keras import layers, ops

from pipeline.class_metrics import BalancedAccuracy, F1Macro

SERIALIZABLE = keras.saving.register_keras_serializable(package="pipeline")


class Augmentation(layers.Layer):
    """A random image transform of `size` pixels in training (`augment`), the identity at
    inference; the base of Cutout and Translate (their config: `size` under its own name)."""

    size_name = "size"

    def __init__(self, size: int, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.size, self.seed = int(size), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        return self.augment(images, ops.shape(images)) if training else images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), self.size_name: self.size, "seed": self.seed}


@SERIALIZABLE
class Cutout(Augmentation):
    """Training only: zero a `size` x `size` square of each image at a uniformly random
    centre, clipped at the borders (DeVries & Taylor 2017). The identity at inference."""

    def augment(self, images, shape):
        centre = keras.random.uniform((shape[0], 2), seed=self.seed_generator)
        top = ops.cast(centre[:, 0] * ops.cast(shape[1], "float32"), "int32") - self.size // 2
        left = ops.cast(centre[:, 1] * ops.cast(shape[2], "float32"), "int32") - self.size // 2
        rows = ops.arange(shape[1], dtype="int32")[None, :]
        cols = ops.arange(shape[2], dtype="int32")[None, :]
        in_rows = ops.logical_and(rows >= top[:, None], rows < top[:, None] + self.size)
        in_cols = ops.logical_and(cols >= left[:, None], cols < left[:, None] + self.size)
        hole = ops.logical_and(in_rows[:, :, None, None], in_cols[:, None, :, None])
        return ops.where(hole, ops.zeros_like(images), images)


@SERIALIZABLE
class Translate(Augmentation):
    """Training only: shift each image by a uniformly random whole number of pixels in
    [-shift, shift] along each axis, zeros shifted in (pad by `shift`, then crop at a random
    offset). The identity at inference. Unlike Keras' RandomTranslation it can be compiled
    (XLA): a model holding RandomTranslation is never jit-compiled, which on JAX means op by op.

    The crops are one gather of pixels from the flattened padded batch, by int32 indices: Keras'
    `take_along_axis` on TensorFlow makes its indices int64, which made oneDNN print an error
    line on the console of every run with this layer."""

    size_name = "shift"

    def __init__(self, shift: int, seed=None, **kwargs):
        super().__init__(shift, seed, **kwargs)

    def augment(self, images, shape):
        s = self.size
        padded = ops.pad(images, [[0, 0], [s, s], [s, s], [0, 0]])
        height, width = shape[1] + 2 * s, shape[2] + 2 * s  # of `padded`
        offsets = keras.random.randint((shape[0], 2), 0, 2 * s + 1, seed=self.seed_generator)
        rows = ops.arange(shape[1], dtype="int32")[None, :] + offsets[:, :1]  # (batch, height) rows of `padded`
        cols = ops.arange(shape[2], dtype="int32")[None, :] + offsets[:, 1:]
        first = ops.arange(shape[0], dtype="int32")[:, None, None] * (height * width)  # each image's first pixel
        pixels = first + rows[:, :, None] * width + cols[:, None, :]  # (batch, height, width)
        return ops.take(ops.reshape(padded, (-1, shape[3])), pixels, axis=0)


@SERIALIZABLE
class Whitening(layers.Layer):
    """The whitening stem (airbench, Page): a frozen `kernel_size` x `kernel_size` "valid"
    conv with 2 k^2 C filters (C input channels) and a trainable bias. Its filters are a
    non-trainable weight, saved with the model; they are zeros, a placeholder, until
    `set_whitening` fits them to the training images (pipeline.train does, before a fit)."""

    def __init__(self, kernel_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)

    def build(self, input_shape):
        k, channels = self.kernel_size, input_shape[-1]
        filters = 2 * k * k * channels
        self.kernel = self.add_weight(shape=(k, k, channels, filters), initializer="zeros", trainable=False,
                                      name="kernel")
        self.bias = self.add_weight(shape=(filters,), initializer="zeros", name="bias")

    def call(self, images):
        return ops.conv(images, ops.cast(self.kernel, images.dtype), padding="valid") + ops.cast(self.bias, images.dtype)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        side = lambda n: None if n is None else n - self.kernel_size + 1  # noqa: E731
        return (batch, side(height), side(width), 2 * self.kernel_size ** 2 * channels)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


# The whitening's epsilon, relative to the mean variance of a patch's pixels: airbench's 5e-4
# on images normalised to unit variance per channel, here on pixels scaled to [0, 1].
WHITEN_EPS = 5e-4


def whitening_filters(x_train: np.ndarray, k: int, eps: float = WHITEN_EPS, chunk_mb: int = 32):
    """(kernel (k, k, C, 2 k^2 C), bias (2 k^2 C,)) of a `Whitening` stem for the uint8 images
    `x_train` (n, height, width, C), scaled to [0, 1] as the model scales them: the
    eigenvectors of the covariance of their k x k patches (largest eigenvalue first), each
    divided by sqrt(eigenvalue + eps x the mean patch-pixel variance), then their negatives;
    the bias centres each filter's output on these patches (minus the filter's response to
    the mean patch), so the stem's first k^2 C outputs have about the identity covariance and
    mean 0 on them, and the others are their negatives. Float64 sums over as many images at a
    time as keep their patches within `chunk_mb` (at 64 px, 1,024 images' patches took 390 MB)."""
    n, height, width, channels = x_train.shape
    d = k * k * channels
    chunk = max(1, (chunk_mb << 20) // ((height - k + 1) * (width - k + 1) * d * 8))
    total, outer, count = np.zeros(d), np.zeros((d, d)), 0
    for start in range(0, n, chunk):
        images = x_train[start:start + chunk].astype(np.float64) / 255
        windows = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(1, 2))  # (b, h', w', C, k, k)
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, d)  # in the kernel's (k, k, C) order
        total, outer, count = total + patches.sum(0), outer + patches.T @ patches, count + len(patches)
    mean = total / count
    covariance = outer / count - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], 0) + eps * np.trace(covariance) / d)
    filters = np.concatenate([scaled, -scaled], axis=1)
    return filters.reshape(k, k, -1, 2 * d).astype("float32"), (-mean @ filters).astype("float32")


# The last fit's whitening filters by (digest of its training images, kernel size): a study's
# trials share their training rows, so every trial after the first reuses them (about 4 s for
# 32,000 CIFAR-10 images on 2 cores, against about 0.1 s for the digest).
_LAST_FILTERS: dict = {}


def set_whitening(model: keras.Model, x_train: np.ndarray) -> None:
    """Fit the filters and bias of `model`'s whitening stem, if it has one, to the uint8
    training images `x_train` (`whitening_filters`; the last fit's if its images were these)."""
    for layer in model.layers:
        if isinstance(layer, Whitening):
            images = hashlib.blake2b(np.ascontiguousarray(x_train).data, digest_size=16).hexdigest()
            key = (images, x_train.shape, layer.kernel_size)
            if key not in _LAST_FILTERS:
                _LAST_FILTERS.clear()
                _LAST_FILTERS[key] = whitening_filters(x_train, layer.kernel_size)
            kernel, bias = _LAST_FILTERS[key]
            layer.kernel.assign(kernel)
            layer.bias.assign(bias)


@SERIALIZABLE
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`peak` over `total_steps` optimizer steps. With progress t = min(step / total_steps, 1)
    and w = `warmup`: for t < w the rate rises linearly from 0 to `peak` (peak * t / w);
    after it, with u = (t - w) / (1 - w), it falls to 0 at the end: `cosine`
    peak * (1 + cos(pi * u)) / 2, or `onecycle` peak * (1 - u) (the triangular one cycle
    of fast CIFAR-10 training). Past `total_steps` the rate stays 0."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.0, shape: str = "cosine"):
        self.peak, self.total_steps, self.warmup, self.shape = float(peak), int(total_steps), float(warmup), shape

    def __call__(self, step):
        t = ops.minimum(ops.cast(step, "float32") / self.total_steps, 1.0)
        u = (t - self.warmup) / (1.0 - self.warmup)
        decay = (1.0 + ops.cos(math.pi * u)) / 2 if self.shape == "cosine" else 1.0 - u
        return self.peak * ops.where(t < self.warmup, t / max(self.warmup, 1e-12), decay)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup, "shape": self.shape}


@SERIALIZABLE
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels smoothed by `label_smoothing` (the target puts
    1 - s + s/K on the label and s/K on each of the K classes). Keras 3's
    SparseCategoricalCrossentropy has no `label_smoothing`; this one-hot encodes the labels
    inside the loss, so the data stay integer labels and `accuracy` stays the metric."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        labels = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(y_pred)[-1])
        return keras.losses.categorical_crossentropy(labels, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def learning_rate(params: dict, total_steps: int | None):
    """`learning_rate`, constant, or the WarmupDecay `schedule` over `total_steps` steps
    (None: a model built but not trained, the dry run: the schedule spans one step)."""
    peak = params.get("learning_rate", 0.001)
    schedule = params.get("schedule", "constant")
    if schedule == "constant":
        return peak
    return WarmupDecay(peak, total_steps or 1, params.get("warmup", 0.0), schedule)


def make_optimizer(name: str, learning_rate, momentum: float | None = None, weight_decay: float | None = None):
    """Keras optimizer `name`. `momentum` (sgd, nesterov; others ignore it) defaults to 0.9
    for nesterov and 0 for sgd; `weight_decay` (decoupled: each step subtracts
    learning rate x weight_decay x weight) None keeps each optimizer's own default (AdamW's
    0.004, none for the others)."""
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name in ("sgd", "nesterov"):
        default = 0.9 if name == "nesterov" else 0.0
        momentum = default if momentum is None else momentum
        return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=name == "nesterov", **decay)
    classes = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "adadelta": keras.optimizers.Adadelta,
        "rmsprop": keras.optimizers.RMSprop,
    }
    return classes[name](learning_rate, **decay)


def augmentation(x, params: dict, input_shape: tuple):
    """`augment_flip` true (horizontal, at random; `alternating` flips are no layer but
    pipeline.train's data, as they need each image's state), `augment_translate` (up to
    that many whole pixels each way, nearest-pixel, zeros shifted in) and `augment_cutout`
    (a square of that side zeroed)."""
    if params.get("augment_flip", False) is True:
        x = layers.RandomFlip("horizontal")(x)
    shift = params.get("augment_translate", 0)
    if shift > 0:
        x = Translate(shift)(x)
    if params.get("augment_cutout", 0) > 0:
        x = Cutout(params["augment_cutout"])(x)
    return x


# Batch norm's moving statistics follow the batches with momentum 0.9 (PyTorch's default), not
# Keras' 0.99. With 0.99 the statistics a model predicts with lag far behind a short run: on
# the CIFAR-10 sample (8,000 train images, batch 64, 125 steps an epoch; 3 blocks of 2 convs,
# 32/64/128 filters, Adam 0.001) validation accuracy after epochs 1-4 was 0.10, 0.12, 0.22,
# 0.41 while training accuracy was 0.24-0.45; without any dropout in the blocks it was the
# same (0.10, 0.11, 0.23, 0.51; train 0.31-0.53), so the dropout before a BN was not the
# cause. The moving variance of the first BN, which no dropout precedes, was still 2.5x
# its input's true variance after 4 epochs: the statistics start at mean 0, variance 1, while
# a conv of [0, 1]-scaled pixels has a variance of a few thousandths, and 0.99^500 of the
# start is still of that size; every later layer inherits the error. Setting each BN's
# statistics to their true values, weights unchanged, raised validation accuracy from 0.41
# to 0.51 (0.51 to 0.57 without dropout). With Adam at 0.003 and batch 128 (63 steps an
# epoch) it stayed at chance: 0.22, 0.10, 0.10, 0.10, the first BN's moving variance 50x the
# true one. With momentum 0.9 the start is forgotten in ~50 steps and the statistics trail
# the weights by ~10: the same run (Adam 0.001, batch 64) scored 0.31, 0.40, 0.44, 0.48, the
# first BN's moving variance 0.98x its input's (0.005). What is left is dropout's variance
# shift: the BNs right behind a dropout layer keep statistics 1.3-1.4x the variance they see
# at inference (dropout off), worth 0.48 -> 0.51 when recalibrated; the modern spaces use
# augmentation and weight decay instead of dropout (python bench/bn_statistics.py).
BN_MOMENTUM = 0.9


@SERIALIZABLE
class BoostedBatchNorm(layers.BatchNormalization):
    """Batch norm whose offset learns `bias_lr` times faster under SGD, the optimizer untouched
    (Page's and airbench's boosted rate on BN biases). The offset is c x a raw trainable
    weight (`raw_beta`, from 0) with c = sqrt(bias_lr), and replaces Keras' own (`center` is
    off): the raw weight's gradient is c times the offset's, so an SGD step (with or without
    momentum) on it moves the offset by c^2 = bias_lr times the step on a plain offset.
    Adam's step does not scale with the gradient, so under Adam (and AdamW, RMSprop) the
    offset moves sqrt(bias_lr) times faster; decoupled weight decay shrinks the offset at the
    optimizer's own rate either way. Saved and loaded like BatchNormalization."""

    def __init__(self, bias_lr: float = 1.0, **kwargs):
        super().__init__(**{**kwargs, "center": False})
        self.bias_lr = float(bias_lr)

    def build(self, input_shape):
        self.raw_beta = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="raw_beta")
        super().build(input_shape)

    def call(self, inputs, training=None, mask=None):
        outputs = super().call(inputs, training=training, mask=mask)
        return outputs + ops.cast(math.sqrt(self.bias_lr) * self.raw_beta, outputs.dtype)

    def get_config(self):
        return {**super().get_config(), "bias_lr": self.bias_lr}


def norm(x, params: dict):
    """Batch norm of `x`: `bn_momentum` (Keras' convention: the weight on the old moving
    statistics), `bn_scale` false freezes the scale at 1 (no gamma), `bn_bias_lr` other
    than 1 boosts the offset's learning rate (BoostedBatchNorm)."""
    options = {"momentum": params.get("bn_momentum", BN_MOMENTUM), "scale": params.get("bn_scale", True)}
    bias_lr = params.get("bn_bias_lr", 1.0)
    return (BoostedBatchNorm(bias_lr, **options) if bias_lr != 1 else layers.BatchNormalization(**options))(x)


@SERIALIZABLE
class Dirac(keras.initializers.Initializer):
    """A conv kernel (height, width, inputs, filters) whose first min(inputs, filters) filters
    are the identity (PyTorch's `dirac_`, airbench): filter i is 1 on input channel i at the
    tap that a "same" conv centres on each pixel ((size - 1) // 2 each way), 0 elsewhere, so
    that it passes channel i through unchanged. The remaining filters are Glorot-uniform,
    Keras' default, with the whole kernel's fans."""

    def __init__(self, seed=None):
        self.seed = seed
        self.glorot = keras.initializers.GlorotUniform(seed)

    def __call__(self, shape, dtype=None):
        dtype = dtype or keras.backend.floatx()
        height, width, inputs, filters = shape
        n = min(inputs, filters)
        identity, rest = np.zeros(shape), np.ones(shape)
        identity[(height - 1) // 2, (width - 1) // 2, range(n), range(n)] = 1
        rest[..., :n] = 0
        return self.glorot(shape, dtype) * ops.convert_to_tensor(rest, dtype) + ops.convert_to_tensor(identity, dtype)

    def get_config(self):
        return {"seed": self.seed}


def conv(x, params: dict, filters: int, kernel_size: int, bias: bool):
    """A "same" conv of `x`, its kernel initialised as `conv_init` says: `default` (Keras'
    Glorot-uniform) or `dirac` (the identity on the first filters, `Dirac`)."""
    init = Dirac() if params.get("conv_init", "default") == "dirac" else "glorot_uniform"
    return layers.Conv2D(filters, kernel_size, padding="same", use_bias=bias, kernel_initializer=init)(x)


def conv_bn(x, params: dict, filters: int, kernel_size: int, batch_norm: bool):
    """A "same" conv, batch-normed (without a bias, which BN's offset replaces) or not."""
    x = conv(x, params, filters, kernel_size, not batch_norm)
    return norm(x, params) if batch_norm else x


def pool_padding(params: dict, x, size: int) -> str:
    """A pool's padding: "same" (a side of n becomes ceil(n / size)), or with `pool_padding`
    valid, "valid" (floor(n / size), PyTorch's and airbench's pools: 31 -> 15 -> 7 -> 3 after a
    2x2 whitening stem, against 16 -> 8 -> 4: 14% fewer multiply-adds in airbench93) where
    both sides are at least `size`, so that a small input still builds."""
    fits = all(side is not None and side >= size for side in x.shape[1:3])
    return "valid" if params.get("pool_padding", "same") == "valid" and fits else "same"


def conv_block(x, params: dict, i: int):
    """Block i: `convs` convs (optionally batch-normed, with `conv_dropout` between them),
    with `residual` the block's input added to their output (through a 1x1 conv where the
    width changes), a pool, then dropout. With `block_order` conv_pool_bn_act (airbench) the
    pool follows the first conv instead (conv, pool, BN, activation, then conv, BN,
    activation for each further conv), and `residual` adds the first conv's output (after
    its activation) to the further convs' output (Page's ResNet-9; none with one conv)."""
    p = lambda key, default=None: params.get(f"conv{i}_{key}", default)  # noqa: E731
    convs, batch_norm, shortcut = p("convs", 1), p("batch_norm", False), x
    pool_class = layers.MaxPooling2D if p("pooling", "max") == "max" else layers.AveragePooling2D
    pool = lambda t: pool_class(p("pool_size"), padding=pool_padding(params, t, p("pool_size")))(t)  # noqa: E731
    pool_first = params.get("block_order", "conv_bn_act") == "conv_pool_bn_act"
    for c in range(convs):
        x = conv(x, params, p("filters"), p("kernel_size"), not batch_norm)
        x = pool(x) if pool_first and c == 0 else x
        x = norm(x, params) if batch_norm else x
        x = layers.Activation(params.get("activation", "relu"))(x)
        shortcut = x if pool_first and c == 0 else shortcut
        if c < convs - 1 and p("conv_dropout", 0.0) > 0:
            x = layers.Dropout(p("conv_dropout"))(x)
    if p("residual", False) and not (pool_first and convs == 1):
        if shortcut.shape[-1] != p("filters"):
            shortcut = conv_bn(shortcut, params, p("filters"), 1, batch_norm)
        x = layers.Add()([x, shortcut])
    x = x if pool_first else pool(x)
    if p("dropout", 0.0) > 0:
        x = layers.Dropout(p("dropout"))(x)
    return x


# `head`: what turns the last block's feature maps into a vector for the dense layers
HEADS = {"flatten": layers.Flatten, "global_avg": layers.GlobalAveragePooling2D, "global_max": layers.GlobalMaxPooling2D}
# `head_scale` of the `global_max` head: the factor on its bias-free output layer's logits
# (airbench's 1/9: max-pooled features are large, and this keeps the first logits small)
HEAD_SCALE = 1 / 9


def build_model(params: dict, input_shape: tuple, n_classes: int, total_steps: int | None = None) -> keras.Model:
    """Build and compile the CNN that `params` describes.

    `total_steps`: the optimizer steps a `schedule` other than constant spans, epochs x
    steps per epoch of the fit to come (a trial's epoch cap, the refit's own epochs); the
    callers that train pass it (pipeline.train). None is for models that are not trained."""
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = augmentation(x, params, input_shape)
    if params.get("whiten", False):  # its filters are placeholders until set_whitening
        x = Whitening(params.get("whiten_kernel", 2), name="whitening")(x)
        x = layers.Activation(params.get("activation", "relu"))(x)
    for i in range(1, params["depth"] + 1):
        x = conv_block(x, params, i)
    head = params.get("head", "flatten")
    x = HEADS[head]()(x)
    max_norm = params.get("dense_max_norm", 0.0)
    for _ in range(params.get("dense_layers", 1)):
        constraint = keras.constraints.MaxNorm(max_norm) if max_norm > 0 else None
        x = layers.Dense(params["dense_units"], activation=params.get("activation", "relu"),
                         kernel_constraint=constraint)(x)
        if params.get("dense_dropout", 0.0) > 0:
            x = layers.Dropout(params["dense_dropout"])(x)
    # float32 even under a mixed policy: a 16-bit softmax loses small probabilities, and the model predicts float32
    if head == "global_max":  # airbench's output layer: bias-free, its logits scaled by a constant
        x = layers.Dense(n_classes, use_bias=False, name="logits", dtype="float32")(x)
        x = layers.Rescaling(params.get("head_scale", HEAD_SCALE), name="logit_scale", dtype="float32")(x)
        outputs = layers.Activation("softmax", name="probabilities", dtype="float32")(x)
    else:
        outputs = layers.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    smoothing = params.get("label_smoothing", 0.0)
    model.compile(
        optimizer=make_optimizer(params.get("optimizer", "adam"), learning_rate(params, total_steps),
                                 params.get("momentum"), params.get("weight_decay")),
        loss=SmoothedSparseCrossentropy(smoothing) if smoothing > 0 else "sparse_categorical_crossentropy",
        metrics=["accuracy", F1Macro(n_classes), BalancedAccuracy(n_classes)],  # each class alike: pipeline.class_metrics
    )
    return model


@SERIALIZABLE
class Mirror(layers.Layer):
    """The images flipped left to right (a test-time view; `with_tta`)."""

    def call(self, images):
        return ops.flip(images, axis=2)


@SERIALIZABLE
class Shift(layers.Layer):
    """The images shifted by `shift` pixels down and right (up and left when negative), the
    border reflected in (a test-time view, airbench's; `with_tta`)."""

    def __init__(self, shift: int, **kwargs):
        super().__init__(**kwargs)
        self.shift = int(shift)

    def call(self, images):
        s, height, width = abs(self.shift), images.shape[1], images.shape[2]
        padded = ops.pad(images, [[0, 0], [s, s], [s, s], [0, 0]], mode="reflect")
        start = s - self.shift
        return padded[:, start:start + height, start:start + width, :]

    def get_config(self):
        return {**super().get_config(), "shift": self.shift}


def tta_views(tta: str) -> list[tuple[float, list]]:
    """(weight, layers applied in turn) of each test-time view of `tta`: `none` no views
    (the model as it is), `flip` the image and its mirror, `flip_shift` airbench's six (half
    the weight on the image and its mirror, half on both shifted one pixel either way)."""
    if tta == "flip":
        return [(0.5, []), (0.5, [Mirror()])]
    if tta == "flip_shift":
        shifted = [(0.125, [Shift(s), *mirror]) for s in (1, -1) for mirror in ([], [Mirror()])]
        return [(0.25, []), (0.25, [Mirror()]), *shifted]
    return []


def for_serving(model: keras.Model) -> keras.Model:
    """A model of `model`'s layers (shared, weights not copied) without its training state: a
    trained model saves its optimizer's variables too (Adam's two per weight: a 22 M-parameter
    model saved in 251 MB, its layers alone in 83 MB), which no served model uses."""
    return keras.Model(model.input, model.output, name=model.name)


def with_tta(model: keras.Model, tta: str) -> keras.Model:
    """`model` predicting the weighted mean of its probabilities over the `tta` views of each
    image (`tta_views`; `none`: `model` itself). The result holds `model` and is what the refit
    scores, logs and serves, so the served model predicts what `test_accuracy` measured."""
    views = tta_views(tta)
    if not views:
        return model
    pixels = keras.Input(shape=model.input_shape[1:], dtype=model.inputs[0].dtype, name="pixels")
    outputs = []
    for weight, steps in views:
        view = pixels
        for step in steps:
            view = step(view)
        outputs.append(layers.Rescaling(weight, dtype="float32")(model(view)))
    return keras.Model(pixels, layers.Add(name="probabilities", dtype="float32")(outputs), name=f"{model.name}_tta")


LATENCY_IMAGES = 256  # images `latency_ms` is timed on (a trial's validation rows, the refit's test rows)
LATENCY_REPEATS = 5  # timed passes over them, after one warm-up pass
INFERENCE_PIXELS = 256 * 32 * 32  # pixels a forward pass outside training takes at most: 256 CIFAR-10 images


def inference_batch(input_shape: tuple) -> int:
    """Images per forward pass when scoring or timing a model: as many as hold INFERENCE_PIXELS,
    at most 256 (256 at CIFAR-10's size and below, 64 at 64 px). A pass's activations grow
    with its pixels: at 64 px, passes of 256 images of photos.yaml's widest net held about 0.5 GB
    more than passes of 64 (bench/README.md)."""
    height, width = input_shape[:2]
    return max(1, min(256, INFERENCE_PIXELS // (height * width)))


def latency_ms(model: keras.Model, x: np.ndarray, repeats: int = LATENCY_REPEATS) -> float:
    """Inference milliseconds per image: the fastest of `repeats` timed passes over the images
    `x` (after one warm-up pass), each in forward passes of `inference_batch` images, divided by
    their count."""
    step = inference_batch(x.shape[1:])

    def one_pass():
        for first in range(0, len(x), step):
            model(x[first:first + step], training=False)

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / len(x)

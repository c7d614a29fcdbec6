"""`build_model(params, input_shape, n_classes)`: a compiled Keras CNN from a plain dict.

Knows nothing about Optuna. The model takes raw uint8 pixels and scales them itself, so a
saved model predicts from raw image arrays. Convs and pools use "same" padding, so every
configuration builds for any input size (8x8 digits included): a pool never shrinks a
side below 1. Under Keras' `mixed_float16` policy (pipeline/device.py) the layers compute
in float16, the output layer stays float32, and `compile` adds loss scaling itself.
"""

from __future__ import annotations

import time

import keras
import numpy as np
from keras import layers


def make_optimizer(name: str, learning_rate: float):
    if name == "nesterov":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    classes = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "adadelta": keras.optimizers.Adadelta,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }
    return classes[name](learning_rate)


def conv_block(x, params: dict, i: int):
    """Block i: `convs` convs (optionally batch-normed, with `conv_dropout` between them),
    a pool, then dropout."""
    p = lambda key, default=None: params.get(f"conv{i}_{key}", default)  # noqa: E731
    convs = p("convs", 1)
    for c in range(convs):
        batch_norm = p("batch_norm", False)
        x = layers.Conv2D(p("filters"), p("kernel_size"), padding="same", use_bias=not batch_norm)(x)
        if batch_norm:
            x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        if c < convs - 1 and p("conv_dropout", 0.0) > 0:
            x = layers.Dropout(p("conv_dropout"))(x)
    pool = layers.MaxPooling2D if p("pooling", "max") == "max" else layers.AveragePooling2D
    x = pool(p("pool_size"), padding="same")(x)
    if p("dropout", 0.0) > 0:
        x = layers.Dropout(p("dropout"))(x)
    return x


def build_model(params: dict, input_shape: tuple, n_classes: int) -> keras.Model:
    """Build and compile the CNN that `params` describes."""
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for i in range(1, params["depth"] + 1):
        x = conv_block(x, params, i)
    x = layers.Flatten()(x)
    max_norm = params.get("dense_max_norm", 0.0)
    for _ in range(params.get("dense_layers", 1)):
        constraint = keras.constraints.MaxNorm(max_norm) if max_norm > 0 else None
        x = layers.Dense(params["dense_units"], activation="relu", kernel_constraint=constraint)(x)
        if params.get("dense_dropout", 0.0) > 0:
            x = layers.Dropout(params["dense_dropout"])(x)
    # float32 even under the mixed_float16 policy: a float16 softmax loses small probabilities
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=make_optimizer(params.get("optimizer", "adam"), params.get("learning_rate", 0.001)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def latency_ms(model: keras.Model, x: np.ndarray, repeats: int = 5) -> float:
    """Inference milliseconds per image: the fastest of `repeats` timed forward passes over
    the batch `x` (after one warm-up pass), divided by its size."""
    model(x, training=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x, training=False)
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / len(x)

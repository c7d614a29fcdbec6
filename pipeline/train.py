"""`train(params, ...) -> metrics`: fit one model on one split. No Optuna, no MLflow here.

Data path: the uint8 train images are converted to tensors once per process (`Images`);
every split and CV fold is only a pair of row-index arrays into them, and each fit reads
them through a `tf.data` pipeline that shuffles indices (not images), gathers a batch of
uint8 rows, and prefetches; the model scales pixels itself. Nothing is copied per trial.

Callers pass callbacks (pruning, logging) in; early stopping on the monitored validation
metric is added here and the best epoch's weights are kept. The metrics returned are those
of the best epoch, prefixed `train_` / `val_`, plus `epochs_needed` (best epoch, 1-based)
and `epochs_run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from pipeline import interrupts
from pipeline.model import build_model


class Images:
    """Labelled uint8 images held once as CPU tensors; `batches` reads rows by index."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        import tensorflow as tf

        with tf.device("/CPU:0"):  # the pool stays in host memory; batches go to the device
            self.x = tf.convert_to_tensor(np.asarray(x, np.uint8))
            self.y = tf.convert_to_tensor(np.asarray(y, np.int32))

    def __len__(self):
        return int(self.y.shape[0])

    def batches(self, rows: np.ndarray, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        """A tf.data pipeline of (uint8 images, labels) batches of `rows`, reshuffled each epoch."""
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices(np.asarray(rows, np.int64))
        if shuffle:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        x, y = self.x, self.y
        ds = ds.batch(batch_size).map(lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)


@dataclass(frozen=True)
class Split:
    """One fold: train and validation row indices into one shared `Images` pool."""

    images: Images
    train_rows: np.ndarray
    val_rows: np.ndarray

    def train_batches(self, batch_size: int, seed: int = 0):
        return self.images.batches(self.train_rows, batch_size, shuffle=True, seed=seed)

    def val_batches(self, batch_size: int):
        return self.images.batches(self.val_rows, batch_size)


def validation_splits(x, y, cv_folds: int, val_fraction: float, seed: int) -> list[Split]:
    """Stratified, seeded splits of the train split: one hold-out split, or k CV folds,
    all sharing one conversion of `x` to tensors."""
    if cv_folds == 1:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    else:
        splitter = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
    images = Images(x, y)
    return [Split(images, tr, va) for tr, va in splitter.split(np.zeros(len(y)), y)]


class StopOnSignal(keras.callbacks.Callback):
    """Raises, after each batch, a Ctrl-C/SIGTERM whose first KeyboardInterrupt Python lost
    (see `pipeline.interrupts`), so that a signalled worker never trains on.

    Async-safe: Keras then keeps running batch-end callbacks in its thread pool instead of
    waiting for each batch's logs; the KeyboardInterrupt raised there reaches the fit one
    batch later, when Keras collects the finished calls."""

    async_safe = True

    def on_train_batch_end(self, batch, logs=None):
        interrupts.check()

    on_test_batch_end = on_train_batch_end


class KeepModel(keras.callbacks.Callback):
    """Hands the fitted model back to a caller that needs more than metrics (latency, test
    scores): after `train`, `.model` holds it with early stopping's best weights restored."""


def prefixed(logs: dict) -> dict:
    """Keras log names -> ours: `accuracy` -> `train_accuracy`, `val_*` unchanged."""
    return {(k if k.startswith("val_") else f"train_{k}"): float(v) for k, v in logs.items()}


def train(
    params: dict,
    split: Split,
    input_shape: tuple,
    n_classes: int,
    *,
    epochs: int,
    monitor: str = "val_accuracy",
    direction: str = "maximize",
    patience: int = 3,
    callbacks: list | None = None,
    seed: int = 42,
) -> dict:
    """Fit a fresh model on `split` and return the best epoch's metrics."""
    keras.utils.set_random_seed(seed)
    model = build_model(params, input_shape, n_classes)
    mode = "max" if direction == "maximize" else "min"
    early = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True)
    batch_size = params.get("batch_size", 32)
    history = model.fit(
        split.train_batches(batch_size, seed),
        validation_data=split.val_batches(batch_size),
        epochs=epochs,
        callbacks=[*(callbacks or []), early, StopOnSignal()],
        shuffle=False,  # the train batches reshuffle themselves
        verbose=0,
    ).history
    scores = history[monitor]
    best = int(np.argmax(scores) if mode == "max" else np.argmin(scores))
    metrics = prefixed({k: v[best] for k, v in history.items()})
    metrics.update(epochs_needed=best + 1, epochs_run=len(scores), params_count=model.count_params())
    return metrics


def fit_full(params: dict, x, y, input_shape: tuple, n_classes: int, *, epochs: int, seed: int = 42, callbacks=None):
    """Refit on the whole train split for a fixed number of epochs; returns the model."""
    keras.utils.set_random_seed(seed)
    model = build_model(params, input_shape, n_classes)
    images = Images(x, y)
    batches = images.batches(np.arange(len(images)), params.get("batch_size", 32), shuffle=True, seed=seed)
    model.fit(batches, epochs=epochs, callbacks=[*(callbacks or []), StopOnSignal()], shuffle=False, verbose=0)
    return model

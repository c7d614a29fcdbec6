"""`train(params, ...) -> metrics`: fit one model on one split. No Optuna, no MLflow here.

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

from pipeline.model import build_model


@dataclass(frozen=True)
class Split:
    """Train and validation arrays of one fold (uint8 images, int labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def validation_splits(x, y, cv_folds: int, val_fraction: float, seed: int) -> list[Split]:
    """Stratified, seeded splits of the train split: one hold-out split, or k CV folds."""
    if cv_folds == 1:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    else:
        splitter = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
    return [Split(x[tr], y[tr], x[va], y[va]) for tr, va in splitter.split(np.zeros(len(y)), y)]


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
    history = model.fit(
        split.x_train,
        split.y_train,
        validation_data=(split.x_val, split.y_val),
        epochs=epochs,
        batch_size=params.get("batch_size", 32),
        callbacks=[*(callbacks or []), early],
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
    model.fit(x, y, epochs=epochs, batch_size=params.get("batch_size", 32), callbacks=callbacks or [], verbose=0)
    return model

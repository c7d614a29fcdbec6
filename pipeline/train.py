"""`train(params, ...) -> metrics`: fit one model on one split. No Optuna, no MLflow here.

Data path: the uint8 train images are held once per process (`Images`); every split and
CV fold is only a pair of row-index arrays into them, and each fit reads batches that
shuffle indices (not images) and gather uint8 rows: on TensorFlow a `tf.data` pipeline
over tensors made once, with prefetch; on JAX and PyTorch a Keras `PyDataset` over the
numpy array. The model scales pixels itself. Nothing is copied per trial.

Callers pass callbacks (pruning, logging) in; early stopping on the monitored validation
metric is added here and the best epoch's weights are kept. The metrics returned are those
of the best epoch, prefixed `train_` / `val_`, plus `epochs_needed` (best epoch, 1-based)
and `epochs_run`. A `class_weight` (`class_weights`: the `class_weight` setting) weighs each
class's loss in every fit, a trial's and the refit's.

A learning-rate schedule (`schedule` param) spans the fit's epoch count: a trial's epoch
cap (early stopping may end it before the rate reaches 0), the refit's own epochs. A
whitening stem's filters (`whiten` param) are fitted to the fit's training rows only, a
trial's or the refit's, before it starts (`model_for`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import keras
import numpy as np
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from pipeline import interrupts
from pipeline.model import build_model, set_whitening
from pipeline.names import prefixed


class Images:
    """Labelled uint8 images held once; `batches` reads rows by index. On TensorFlow the pool
    is converted to CPU tensors once and read through tf.data; on JAX and PyTorch it stays a
    numpy array read by a Keras `PyDataset` (no TensorFlow needed)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = np.asarray(x, np.uint8), np.asarray(y, np.int32)
        self.tf = keras.backend.backend() == "tensorflow"
        if self.tf:
            import tensorflow as tf

            with tf.device("/CPU:0"):  # the pool stays in host memory; batches go to the device
                self.x, self.y = tf.convert_to_tensor(self.x), tf.convert_to_tensor(self.y)

    def __len__(self):
        return int(self.y.shape[0])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The uint8 images of `rows`, as a numpy array."""
        if not self.tf:
            return self.x[rows]
        import tensorflow as tf

        return tf.gather(self.x, rows).numpy()

    def batches(self, rows: np.ndarray, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                flips: AlternatingFlips | None = None):
        """(uint8 images, labels) batches of `rows`, reshuffled each epoch when `shuffle`, each
        image flipped as `flips` says for the epoch (its callback must be in the fit's)."""
        rows = np.asarray(rows, np.int64)
        if not self.tf:
            return RowBatches(self.x, self.y, rows, batch_size, shuffle, seed, flips)
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices(rows)
        if shuffle:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        x, y = self.x, self.y

        def read(i):
            images = tf.gather(x, i)
            return (images if flips is None else flips.tf_flip(images, i)), tf.gather(y, i)

        ds = ds.batch(batch_size).map(read).prefetch(PREFETCH)
        return ds.with_options(_not_autotuned())


PREFETCH = 2  # batches gathered ahead of the model, a fixed depth (autotuning is off, `_not_autotuned`)


def _not_autotuned():
    """tf.data options without autotuning. An autotuned iterator has a model thread that sleeps
    up to a minute between optimizations, and deleting the iterator waited that sleep out: a
    refit (no validation) returned 9-44 s after its last epoch on 40,000 CIFAR-10 images, none
    without autotuning (bench/refit_stall.py, bench/README.md)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


class AlternatingFlips(keras.callbacks.Callback):
    """airbench's alternating flips (`augment_flip: alternating`), applied where the batches
    are read: each of the pool's `n_images` images gets a random flip state once (seeded);
    an image is read flipped horizontally as its state says in even epochs (so epoch 0 flips
    a random half) and the other way in odd ones, so every image is seen both ways in every
    two epochs. As a callback of the fit it learns the epoch before the epoch's batches are
    read (Keras makes each epoch's iterator after `on_epoch_begin`)."""

    def __init__(self, n_images: int, seed: int):
        super().__init__()
        self.state, self.epoch = np.random.default_rng(seed).random(n_images) < 0.5, 0
        self.tf_state = self.tf_epoch = None
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.device("/CPU:0"):
                self.tf_state, self.tf_epoch = tf.constant(self.state), tf.Variable(0, dtype=tf.int64, trainable=False)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.tf_epoch is not None:
            self.tf_epoch.assign(epoch)

    def flip(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The numpy `images` of pool `rows`, flipped as this epoch says."""
        flipped = self.state[rows] != (self.epoch % 2 == 1)
        return np.where(flipped[:, None, None, None], images[:, :, ::-1], images)

    def tf_flip(self, images, rows):
        """`flip` in a tf.data pipeline (the epoch read when a batch is made)."""
        import tensorflow as tf

        flipped = tf.not_equal(tf.gather(self.tf_state, rows), tf.equal(self.tf_epoch % 2, 1))
        return tf.where(flipped[:, None, None, None], tf.reverse(images, [2]), images)


def alternating_flips(params: dict, images: Images, seed: int) -> AlternatingFlips | None:
    """The fit's AlternatingFlips over the pool `images`, if `augment_flip` is alternating."""
    return AlternatingFlips(len(images), seed) if params.get("augment_flip") == "alternating" else None


class WeightAverage(keras.callbacks.Callback):
    """airbench's weight averaging: every `every` steps the average of all the model's
    weights, batch norm's moving statistics included (so they match the averaged weights, as
    airbench averages its whole state), moves towards the current ones, a <- d a + (1 - d) w,
    with a decay d = `base` ** `every` x progress ** 3 that grows from 0 (the average is the
    current weights early on) to about 0.77 at the fit's end. `weight_average: ema` trains on
    the current weights; `lookahead` (`copy_back`, airbench's own) then sets the model to the
    average, so that training resumes from it. The averaged weights are what is validated
    (swapped in for each validation), what an epoch ends with (so early stopping keeps and
    restores them, and pruning sees their scores), and what the fit returns. Must come before
    the callbacks that read the model at an epoch's end."""

    def __init__(self, every: int = 5, base: float = 0.95, copy_back: bool = False):
        super().__init__()
        self.every, self.base, self.copy_back = every, base, copy_back
        self.average = self.current = None
        self.step = 0

    def on_train_begin(self, logs=None):
        self.average, self.step = self.model.get_weights(), 0
        self.total = max(1, (self.params.get("steps") or 1) * (self.params.get("epochs") or 1))

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            if hasattr(self.model, "jax_state_sync"):  # JAX: the step's weights back into the model
                self.model.jax_state_sync()
            decay = self.base ** self.every * min(self.step / self.total, 1.0) ** 3
            self.average = [decay * a + (1 - decay) * w for a, w in zip(self.average, self.model.get_weights())]
            if self.copy_back:  # on JAX the synced state above makes the next step read these
                self.model.set_weights(self.average)

    def _swap_in(self):
        if self.current is None:
            self.current = self.model.get_weights()
            self.model.set_weights(self.average)

    def _swap_out(self):
        if self.current is not None:
            self.model.set_weights(self.current)
            self.current = None

    def on_test_begin(self, logs=None):
        self._swap_in()

    def on_test_end(self, logs=None):
        self._swap_out()

    def on_epoch_end(self, epoch, logs=None):
        self._swap_in()

    def on_epoch_begin(self, epoch, logs=None):
        self._swap_out()

    def on_train_end(self, logs=None):
        self._swap_in()
        self.current = None  # the averaged weights stay


def fit_callbacks(params: dict, images: Images, seed: int, middle: list) -> tuple[list, AlternatingFlips | None]:
    """The callbacks of a fit of `params` around `middle` (the caller's): weight averaging
    first (the others read its weights), the signal check and alternating flips last; and the
    flips, which the training batches read."""
    kind = params.get("weight_average", "none")
    average = [WeightAverage(copy_back=kind == "lookahead")] if kind != "none" else []
    flips = alternating_flips(params, images, seed)
    return [*average, *middle, StopOnSignal(), *([flips] if flips else [])], flips


class RowBatches(keras.utils.PyDataset):
    """Batches of numpy rows by index, for the JAX and PyTorch backends: batch i gathers
    `batch_size` rows of the (optionally shuffled) row order; the order is redrawn after each
    epoch from a generator seeded once; `flips` (AlternatingFlips or None) flips images."""

    def __init__(self, x, y, rows, batch_size: int, shuffle: bool, seed: int, flips=None):
        super().__init__()
        self.x, self.y, self.rows, self.batch_size, self.shuffle = x, y, rows, batch_size, shuffle
        self.flips = flips
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(rows) if shuffle else rows

    def __len__(self):
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, i):
        index = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.x[index] if self.flips is None else self.flips.flip(self.x[index], index)
        return images, self.y[index]

    def on_epoch_end(self):
        if self.shuffle:
            self.order = self.rng.permutation(self.rows)


@dataclass(frozen=True)
class Split:
    """One fold: train and validation row indices into one shared `Images` pool."""

    images: Images
    train_rows: np.ndarray
    val_rows: np.ndarray

    def train_batches(self, batch_size: int, seed: int = 0, flips: AlternatingFlips | None = None):
        return self.images.batches(self.train_rows, batch_size, shuffle=True, seed=seed, flips=flips)

    def val_batches(self, batch_size: int):
        return self.images.batches(self.val_rows, batch_size)


def validation_splits(x, y, cv_folds: int, val_fraction: float, seed: int,
                      val_rows: np.ndarray | None = None) -> list[Split]:
    """Stratified, seeded splits of the train split: one hold-out split, or k CV folds,
    all sharing one conversion of `x` to tensors. `val_rows` (a validation folder's rows,
    pipeline.data): with `cv_folds=1` they are the validation split and every other row
    trains (`val_fraction` unused); with `cv_folds > 1` the folds are drawn from all rows,
    the validation folder's pooled with train/'s."""
    images = Images(x, y)
    if val_rows is not None and cv_folds == 1:
        val_rows = np.asarray(val_rows, np.int64)
        return [Split(images, np.setdiff1d(np.arange(len(y)), val_rows), val_rows)]
    if cv_folds == 1:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    else:
        splitter = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
    return [Split(images, tr, va) for tr, va in splitter.split(np.zeros(len(y)), y)]


def class_weights(how: str, y: np.ndarray, n_classes: int) -> dict[int, float] | None:
    """Keras' `class_weight` of a fit on labels `y`: None for `none`; for `balanced` each
    class weighs n / (classes x its count), as scikit-learn's "balanced" (a class absent from
    `y` weighs 1), so every class adds as much to the loss as any other."""
    if how == "none":
        return None
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes)
    return {c: (len(y) / (n_classes * int(n)) if n else 1.0) for c, n in enumerate(counts)}


def scheduled_model(params: dict, input_shape: tuple, n_classes: int, train_images: int, epochs: int) -> keras.Model:
    """`build_model` with the schedule spanning `epochs` passes over `train_images` images, its
    training state made (`make_training_state`)."""
    steps_per_epoch = math.ceil(train_images / params.get("batch_size", 32))
    model = build_model(params, input_shape, n_classes, total_steps=epochs * steps_per_epoch)
    make_training_state(model, input_shape)
    return model


def make_training_state(model: keras.Model, input_shape: tuple) -> None:
    """Make the optimizer's and the metrics' variables before the fit, from the shapes alone, as
    Keras does itself on JAX and under a distribution strategy. Left to the fit on TensorFlow, the
    first trace of the train step makes them, and TensorFlow traces a function that makes variables
    twice: a 2-epoch digits fit took 1.27 CPU s, 0.86 with its state made first (bench/fit_setup.py)."""
    model._symbolic_build(data_batch=(np.zeros((1, *input_shape), np.uint8), np.zeros(1, np.int32)))


def model_for(params: dict, input_shape: tuple, n_classes: int, images: Images, rows: np.ndarray,
              epochs: int) -> keras.Model:
    """The model a fit of `epochs` passes over the training `rows` of `images` starts from:
    `scheduled_model`, with a whitening stem's filters (`whiten`) fitted to those rows, never
    to validation or test rows (pipeline.model.set_whitening)."""
    model = scheduled_model(params, input_shape, n_classes, len(rows), epochs)
    if params.get("whiten", False):
        set_whitening(model, images.take(rows))
    return model


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


class StopAt(keras.callbacks.Callback):
    """Ends a fit after the batch during which the clock passed `when` (epoch seconds): a time
    budget's refit never runs into the budget's reserve, nor a search's trial into the refit's
    time, even when an epoch took longer than planned. `label` says what stopped, in one line
    (None: nothing printed)."""

    def __init__(self, when: float, label: str | None = "refit: stopped at the time budget's end"):
        super().__init__()
        self.when, self.label, self.stopped = when, label, False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not self.stopped and time.time() >= self.when:
            self.stopped = self.model.stop_training = True
            self.where = f"epoch {self.epoch + 1} cut short at batch {batch + 1}"
            if self.label:
                print(f"{self.label} ({self.where})", flush=True)


class KeepModel(keras.callbacks.Callback):
    """Hands the fitted model back to a caller that needs more than metrics (latency, test
    scores): after `train`, `.model` holds it with early stopping's best weights restored."""


class EpochLines(keras.callbacks.Callback):
    """Prints one line per epoch (`<label> epoch 3/12: 41.2 s, train_loss 1.2345, ...`), so a
    long fit without a progress bar (the refit) shows where it is."""

    def __init__(self, label: str, epochs: int):
        super().__init__()
        self.label, self.epochs = label, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        scores = ", ".join(f"{k} {v:.4f}" for k, v in prefixed(logs or {}).items())
        print(f"{self.label} epoch {epoch + 1}/{self.epochs}: {time.perf_counter() - self._start:.1f} s, {scores}",
              flush=True)


def clear_session() -> None:
    """Keras' `clear_session` without its full garbage collection (see `fresh_start`), keeping
    the global dtype policy, which it resets to float32: the process trains in the precision
    pipeline.device set (from 6aa7629, 2026-12-01, to 2026-12-07 every fit trained in float32,
    `mixed_precision=1` and bench/epoch_time.py's `--policy` included)."""
    policy = keras.mixed_precision.global_policy()
    keras.backend.clear_session(free_memory=False)
    keras.mixed_precision.set_global_policy(policy)


def fresh_start(seed: int) -> None:
    """Before a model is built: drop the state Keras keeps from earlier models in this process
    (`clear_session`; models already built stay usable), then seed. Without Keras' full garbage
    collection: in a process whose libraries are not frozen (pipeline.process; a test session,
    a notebook) it rescans half a million of their objects, 0.2 s a model; the search collects
    after each trial itself (Optuna's `gc_after_trial`, with those objects frozen)."""
    clear_session()
    keras.utils.set_random_seed(seed)


@contextlib.contextmanager
def forget_custom_gradients():
    """Unregisters, when the block ends, the gradient functions TensorFlow registered in it for
    `tf.custom_gradient`. Keras' TensorFlow optimizer sums gradients through the replica
    context's `all_reduce`, a custom gradient that registers one function per trace of the
    train step (`CustomGradient-<n>`, never removed), and each closes over that trace's
    tensors: every fitted model's traced graphs stayed alive, `clear_session` or not, and a
    worker's memory grew with every trial (bench/memory_trials.py). The entries are needed
    only while a step is traced; a fit traces its steps inside the block."""
    registry = None
    if keras.backend.backend() == "tensorflow":
        from tensorflow.python.framework import ops

        registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    before = set(registry) if isinstance(registry, dict) else None
    try:
        yield
    finally:
        if before is not None:
            for name in set(registry) - before:
                if name.startswith("CustomGradient-"):
                    del registry[name]


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
    class_weight: dict[int, float] | None = None,
) -> dict:
    """Fit a fresh model on `split` and return the best epoch's metrics. `class_weight`:
    Keras' loss weight of each class (`class_weights`), None = all 1."""
    fresh_start(seed)
    model = model_for(params, input_shape, n_classes, split.images, split.train_rows, epochs)
    mode = "max" if direction == "maximize" else "min"
    early = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True)
    batch_size = params.get("batch_size", 32)
    callbacks, flips = fit_callbacks(params, split.images, seed, [*(callbacks or []), early])
    with forget_custom_gradients():
        history = model.fit(
            split.train_batches(batch_size, seed, flips),
            validation_data=split.val_batches(batch_size),
            epochs=epochs,
            callbacks=callbacks,
            class_weight=class_weight,
            shuffle=False,  # the train batches reshuffle themselves
            verbose=0,
        ).history
    scores = history[monitor]
    best = int(np.argmax(scores) if mode == "max" else np.argmin(scores))
    metrics = prefixed({k: v[best] for k, v in history.items()})
    metrics.update(epochs_needed=best + 1, epochs_run=len(scores), params_count=model.count_params())
    return metrics


def fit_full(params: dict, x, y, input_shape: tuple, n_classes: int, *, epochs: int, seed: int = 42, callbacks=None,
             stop_at: float | None = None, class_weight: dict[int, float] | None = None):
    """Refit on the whole train split for a fixed number of epochs (`stop_at`: or until then,
    epoch seconds), with `class_weight` as `train`'s; returns the model."""
    fresh_start(seed)
    if stop_at is not None:
        callbacks = [*(callbacks or []), StopAt(stop_at)]
    images = Images(x, y)
    model = model_for(params, input_shape, n_classes, images, np.arange(len(images)), epochs)
    callbacks, flips = fit_callbacks(params, images, seed, callbacks or [])
    batches = images.batches(np.arange(len(images)), params.get("batch_size", 32), shuffle=True, seed=seed, flips=flips)
    with forget_custom_gradients():
        model.fit(batches, epochs=epochs, callbacks=callbacks, class_weight=class_weight, shuffle=False, verbose=0)
    return model

"""A short timed fit that says what training costs on this machine, with these threads.

    cost = probe(params, x, y, rows, input_shape, n_classes)   # a pipeline.budget.plan.Cost

It builds the configuration's model and trains it on WARMUP + BATCHES batches of the given
training rows (never validation or test rows); the batches after the warm-up give the seconds
per batch (their median), the rest the fixed cost of a fit (building, compiling, tracing). On
machine G (2026-12-01, one thread, the CIFAR-10 recipe's net) three probes said 38-45 s an
epoch of 10,000 images and the epoch then took 46 s (bench/README.md). The model is thrown
away. A few seconds on CIFAR-10-sized images; the digits data is small enough to run through.
It trains in the process's dtype policy, which pipeline.device.configure set before (cli.run):
the probe times the precision that trains (`precision`).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from pipeline.budget.plan import Cost
from pipeline.train import Images, clear_session, model_for

WARMUP, BATCHES = 3, 20  # batches untimed (tracing, caches), then timed


class _BatchClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def probe(params: dict, x, y, rows, input_shape: tuple, n_classes: int, *, seed: int = 0,
          warmup: int = WARMUP, batches: int = BATCHES) -> Cost:
    """The `Cost` of training `params` on this machine, measured on `warmup` + `batches` batches
    of `rows` (fewer for an evaluation's own probe, pipeline.search)."""
    batch_size = params.get("batch_size", 32)
    take = np.asarray(rows)[: batch_size * (warmup + batches)]
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    images = Images(x[take], y[take])
    model = model_for(params, input_shape, n_classes, images, np.arange(len(take)), 1)
    clock = _BatchClock()
    model.fit(images.batches(np.arange(len(take)), batch_size, shuffle=True, seed=seed), epochs=1,
              callbacks=[clock], shuffle=False, verbose=0)
    ends = clock.ends
    first = min(warmup, len(ends) - 2)
    if first < 0:  # one batch only: all of it counts as the batch
        return Cost(0.0, ends[-1] - start, batch_size)
    batch = float(np.median(np.diff(ends[first:])))  # the median: a batch another process slowed counts little
    setup = max(0.0, ends[first] - start - (first + 1) * batch)
    del model
    clear_session()  # no full collection, the dtype policy kept: see pipeline.train
    return Cost(setup, batch, batch_size)

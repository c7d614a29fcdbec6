"""What the class-balanced epoch metrics cost (issue 40): the same model and rows fitted with
`accuracy` only and with `accuracy`, `f1_macro` and `balanced_accuracy` (pipeline.class_metrics,
what `build_model` compiles), interleaved, on N random uint8 images of S x S x 3 and 10 classes
with a 20% validation split; median epoch seconds after each fit's first (tracing) epoch.

    python bench/class_metrics_cost.py                      # 4,000 images of 32x32, 3 epochs, 3 pairs
    python bench/class_metrics_cost.py --n 2000 --size 64

Last line: `n size epochs pairs plain_epoch_s balanced_epoch_s ratio` (target ratio <= 1.03).
"""

from __future__ import annotations

import argparse

from common import EpochClock, result_line

import numpy as np  # noqa: I001

from pipeline.train import Images, Split, fresh_start, model_for

PARAMS = {"depth": 2, "conv1_filters": 32, "conv1_kernel_size": 3, "conv1_pool_size": 2, "conv2_filters": 64,
          "conv2_kernel_size": 3, "conv2_pool_size": 2, "dense_units": 128, "batch_size": 64}


def epoch_seconds(split: Split, shape: tuple, epochs: int, balanced: bool) -> float:
    fresh_start(0)
    model = model_for(PARAMS, shape, 10, split.images, split.train_rows, epochs)
    if not balanced:  # the same model, compiled as before issue 40
        model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    clock = EpochClock()
    model.fit(split.train_batches(64), validation_data=split.val_batches(64), epochs=epochs, callbacks=[clock],
              shuffle=False, verbose=0)
    return clock.steady()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3)
    a = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (a.n, a.size, a.size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, a.n).astype(np.int32)
    rows = rng.permutation(a.n)
    split = Split(Images(x, y), rows[a.n // 5:], rows[: a.n // 5])
    times = {False: [], True: []}
    for pair in range(a.pairs):
        for balanced in (False, True):
            times[balanced].append(epoch_seconds(split, x.shape[1:], a.epochs, balanced))
            print(f"pair {pair + 1}: {'balanced' if balanced else 'plain'} {times[balanced][-1]:.3f} s an epoch",
                  flush=True)
    plain, balanced = float(np.median(times[False])), float(np.median(times[True]))
    print(result_line(dict(n=a.n, size=a.size, epochs=a.epochs, pairs=a.pairs, plain_epoch_s=plain,
                           balanced_epoch_s=balanced, ratio=balanced / plain)))


if __name__ == "__main__":
    main()

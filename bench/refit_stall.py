"""The refit's tear-down stall: seconds between a fit's last epoch and its return.

A refit (`pipeline.train.fit_full`) on CIFAR-10's 40,000 training images with the recipe's
start configuration (search_spaces/cifar10_start.yaml), in one process:

    python bench/refit_stall.py                               # before, then after; 2 epochs each
    python bench/refit_stall.py --epochs 1 --variants after

`before` is the input `Images.batches` built until 2026-12-01 (tf.data, map and prefetch
AUTOTUNE) under the same model and `model.fit` call as `fit_full`; `after` is `fit_full` as it
is now. Per fit it prints each epoch's seconds, the part of each spent before its first batch
(`start_wait`), the tail (last epoch's end to the fit's return), the whole fit's seconds and
its CPU seconds (user + system, all threads: less sensitive to other load than wall time).
Variants may repeat (`before,after,before,after`); a repeated one's figures are its last. Last line: `name=value` pairs, per variant.
"""

from __future__ import annotations

import argparse
import time

from common import ROOT, result_line

import keras  # noqa: E402
import numpy as np  # noqa: E402


class Marks(keras.callbacks.Callback):
    """Clock marks of one fit: each epoch's begin, first batch and end, and the fit's end."""

    def on_train_begin(self, logs=None):
        self.begins, self.first_batches, self.ends = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begins.append(time.perf_counter())

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.first_batches.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())


def autotuned_batches(images, batch_size: int, seed: int):
    """The refit's input until 2026-12-01: shuffled rows, gathered by an autotuned map and prefetch."""
    import tensorflow as tf

    rows = np.arange(len(images))
    ds = tf.data.Dataset.from_tensor_slices(rows).shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    x, y = images.x, images.y
    ds = ds.batch(batch_size).map(lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def fit_before(params, x, y, input_shape, n_classes, *, epochs: int, seed: int, callbacks):
    from pipeline.train import Images, StopOnSignal, fresh_start, scheduled_model

    fresh_start(seed)
    model = scheduled_model(params, input_shape, n_classes, len(y), epochs)
    batches = autotuned_batches(Images(x, y), params.get("batch_size", 32), seed)
    model.fit(batches, epochs=epochs, callbacks=[*callbacks, StopOnSignal()], shuffle=False, verbose=0)
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "cifar10-train"))
    ap.add_argument("--images", type=int, default=0, help="first N training images (0 = all 40,000)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", default="before,after")
    args = ap.parse_args(argv)

    from pipeline.data import load_dataset
    from pipeline.train import fit_full
    from pipeline.warm_start import load_configurations

    data = load_dataset(args.dataset, 42, 0)
    params = next(iter(load_configurations(ROOT / "search_spaces" / "cifar10_start.yaml")[1].values()))
    x, y = (data.x_train[:args.images], data.y_train[:args.images]) if args.images else (data.x_train, data.y_train)
    fits = {"before": fit_before, "after": fit_full}
    out = {"images": len(y), "epochs": args.epochs}
    for variant in args.variants.split(","):
        marks = Marks()
        start, cpu = time.perf_counter(), time.process_time()
        fits[variant](params, x, y, data.input_shape, data.n_classes, epochs=args.epochs, seed=42, callbacks=[marks])
        returned = time.perf_counter()
        epochs = [e - b for b, e in zip(marks.begins, marks.ends)]
        waits = [f - b for b, f in zip(marks.begins, marks.first_batches)]
        tail, fit, cpu = returned - marks.ends[-1], returned - start, time.process_time() - cpu
        print(f"{variant}: epochs {', '.join(f'{s:.1f}' for s in epochs)} s (start_wait "
              f"{', '.join(f'{s:.1f}' for s in waits)} s), tail {tail:.1f} s, fit {fit:.1f} s, "
              f"{cpu:.0f} CPU s", flush=True)
        out.update({f"{variant}_epoch_s": round(float(np.mean(epochs)), 1),
                    f"{variant}_start_wait_s": round(float(np.max(waits[1:] or [0.0])), 1),
                    f"{variant}_tail_s": round(tail, 1), f"{variant}_fit_s": round(fit, 1),
                    f"{variant}_cpu_s": round(cpu)})
    print(result_line(out))
    return out


if __name__ == "__main__":
    main()

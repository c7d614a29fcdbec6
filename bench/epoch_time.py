"""Per-epoch wall time of a few fixed configurations, to size a search budget.

    python bench/epoch_time.py --dataset ../shared/data/cifar10-sample --epochs 2

Trains each configuration in CANDIDATES (or those named by --only) with the pipeline's
`train` on the pipeline's validation split and prints, per configuration, the median
per-epoch seconds after the first (tracing) epoch and the best validation accuracy.
`--policy mixed_bfloat16` trains in bfloat16 with float32 variables. Last line: `name=value`
pairs, `<config>_epoch_s` and `<config>_val_accuracy`.
"""

from __future__ import annotations

import argparse

from common import EpochClock, result_line

from pipeline.data import load_dataset  # noqa: E402
from pipeline.train import train, validation_splits  # noqa: E402


def vgg(depth, filters, convs, batch_size, dropout=0.25, dense_units=256, dense_layers=1, **extra):
    params = {"depth": depth, "dense_units": dense_units, "dense_layers": dense_layers, "dense_dropout": 0.4,
              "optimizer": "adam", "learning_rate": 0.001, "batch_size": batch_size}
    for i, f in enumerate(filters, 1):
        params.update({f"conv{i}_filters": f, f"conv{i}_kernel_size": 3, f"conv{i}_pool_size": 2,
                       f"conv{i}_convs": convs, f"conv{i}_pooling": "max", f"conv{i}_batch_norm": True,
                       f"conv{i}_dropout": dropout})
    params.update(extra)
    return params


def resnet(filters, convs, batch_size=128, learning_rate=0.1, **extra):
    """A residual, batch-normed net with a global-average head and the recipe's training
    (flip, 2-pixel translation, Nesterov one-cycle, label smoothing 0.2, weight decay)."""
    params = {"depth": len(filters), "head": "global_avg", "dense_layers": 0, "augment_flip": True,
              "augment_translate": 2, "optimizer": "nesterov", "learning_rate": learning_rate,
              "batch_size": batch_size, "schedule": "onecycle", "warmup": 0.25, "label_smoothing": 0.2,
              "weight_decay": 0.005}
    for i, (f, c) in enumerate(zip(filters, convs), 1):
        params.update({f"conv{i}_filters": f, f"conv{i}_kernel_size": 3, f"conv{i}_pool_size": 2,
                       f"conv{i}_convs": c, f"conv{i}_batch_norm": True, f"conv{i}_residual": True})
    params.update(extra)
    return params


CANDIDATES = {
    "vgg3x2_32_b64": vgg(3, (32, 64, 128), 2, 64),
    "vgg3x2_32_b128": vgg(3, (32, 64, 128), 2, 128),
    "vgg3x1_32_b64": vgg(3, (32, 64, 128), 1, 64),
    "vgg3x2_16_b64": vgg(3, (16, 32, 64), 2, 64),
    "vgg2x2_32_b64": vgg(2, (32, 64), 2, 64),
    # cifar10.yaml's widest and narrowest nets, and baselines.yaml's resnet_small
    "recipe_max": resnet((32, 64, 64), (1, 2, 2)),
    "recipe_min": resnet((32, 48, 48), (1, 1, 1)),
    "resnet_small": resnet((32, 64, 128), (2, 2, 2)),
    "resnet_wide": resnet((64, 128, 256), (1, 2, 2)),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/cifar10-sample")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--policy", default="float32", help="Keras dtype policy, e.g. mixed_bfloat16 (CPUs with AVX512-BF16/AMX)")
    args = ap.parse_args(argv)
    import keras

    keras.mixed_precision.set_global_policy(args.policy)
    data = load_dataset(args.dataset)
    split = validation_splits(data.x_train, data.y_train, 1, 0.2, 42)[0]
    out = {}
    for name in args.only:
        clock = EpochClock()
        m = train(CANDIDATES[name], split, data.input_shape, data.n_classes, epochs=args.epochs,
                  patience=args.epochs, callbacks=[clock])
        out[f"{name}_epoch_s"] = round(clock.steady(), 2)
        out[f"{name}_val_accuracy"] = round(m["val_accuracy"], 4)
        print(name, "epoch seconds:", [round(float(s), 1) for s in clock.fits[-1]], "val_accuracy:", out[f"{name}_val_accuracy"],
              "params:", m["params_count"], flush=True)
    print(result_line(out))


if __name__ == "__main__":
    main()

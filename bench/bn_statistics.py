"""Why batch norm sat at chance on the CIFAR-10 sample: the moving statistics against the
true statistics of each BN layer's input, after a short run.

    python bench/bn_statistics.py --dataset ../shared/data/cifar10-sample --epochs 4 --bn-momentum 0.99

Trains a 3-block VGG net (2 convs per block, 32/64/128 filters, batch norm, dropout after
each pool unless --dropout 0) with the pipeline's `train` on its validation split, prints the
validation accuracy per epoch, then per BN layer: its input's variance on 2,000 training
images with dropout off (as at inference) and on, over the layer's moving variance; and
the validation accuracy after setting every BN's statistics to the dropout-off values
(same weights). Ratios far below 1 mean the moving statistics lag the weights.
"""

from __future__ import annotations

import argparse

from common import result_line

import keras  # noqa: E402
import numpy as np  # noqa: E402

import pipeline.model  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.train import KeepModel, train, validation_splits  # noqa: E402


def vgg_bn(dropout: float, learning_rate: float, batch_size: int) -> dict:
    params = {"depth": 3, "dense_units": 256, "dense_layers": 1, "dense_dropout": 0.4,
              "optimizer": "adam", "learning_rate": learning_rate, "batch_size": batch_size}
    for i, f in enumerate((32, 64, 128), 1):
        params.update({f"conv{i}_filters": f, f"conv{i}_kernel_size": 3, f"conv{i}_pool_size": 2,
                       f"conv{i}_convs": 2, f"conv{i}_batch_norm": True, f"conv{i}_dropout": dropout})
    return params


def bn_inputs(model, x, training: bool):
    """(layer, its input's activations per channel) of every BN layer."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            sub = keras.Model(model.input, layer.input)
            yield layer, np.asarray(sub(x, training=training)).reshape(-1, layer.input.shape[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/cifar10-sample")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bn-momentum", type=float, default=pipeline.model.BN_MOMENTUM)
    ap.add_argument("--dropout", type=float, default=0.25)
    ap.add_argument("--learning-rate", type=float, default=0.001)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    pipeline.model.BN_MOMENTUM = args.bn_momentum
    data = load_dataset(args.dataset)
    split = validation_splits(data.x_train, data.y_train, 1, 0.2, 42)[0]
    keep, history = KeepModel(), keras.callbacks.History()
    train(vgg_bn(args.dropout, args.learning_rate, args.batch_size), split, data.input_shape, data.n_classes,
          epochs=args.epochs, patience=args.epochs, callbacks=[keep, history])
    model, sample = keep.model, data.x_train[split.train_rows[:2000]]
    x_val, y_val = data.x_train[split.val_rows], data.y_train[split.val_rows]
    print("val_accuracy per epoch:", [round(v, 3) for v in history.history["val_accuracy"]])
    on = {layer.name: a.var(0) for layer, a in bn_inputs(model, sample, training=True)}
    for layer, a in bn_inputs(model, sample, training=False):
        moving = np.asarray(layer.moving_variance)
        print(f"{layer.name}: input variance {np.median(a.var(0)):.4f}, moving {np.median(moving):.4f}, "
              f"true/moving dropout off {np.median(a.var(0) / moving):.3f}, on {np.median(on[layer.name] / moving):.3f}")
    for layer, a in bn_inputs(model, sample, training=False):  # in order: each sees the ones before recalibrated
        layer.moving_mean.assign(a.mean(0))
        layer.moving_variance.assign(a.var(0))
    recalibrated = float((model.predict(x_val, verbose=0, batch_size=256).argmax(1) == y_val).mean())
    print(result_line({"val_accuracy": round(max(history.history["val_accuracy"]), 4),
                       "recalibrated_val_accuracy": round(recalibrated, 4)}))


if __name__ == "__main__":
    main()

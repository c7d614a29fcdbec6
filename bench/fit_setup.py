"""The fixed cost of a fit: CPU seconds of `pipeline.train.train` (2 epochs of one small digits
model, in this process) with the training state made before the fit, as the pipeline does
(`make_training_state`), and left to the fit's first trace, as plain Keras does on TensorFlow;
beside each, how often the train step was traced per fit.

    python bench/fit_setup.py [--fits 6]

The first fit of each side is left out of the mean (TensorFlow's own first-use costs).
"""

from __future__ import annotations

import argparse
import resource

from common import result_line

import keras.src.backend.tensorflow.trainer as keras_tf_trainer  # noqa: E402

import pipeline.train as train_module  # noqa: E402
from pipeline.data import load_digits  # noqa: E402

PARAMS = {"depth": 1, "conv1_filters": 8, "conv1_kernel_size": 3, "conv1_pool_size": 2, "dense_units": 32}


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fits", type=int, default=6, help="fits per side (the first is left out)")
    args = ap.parse_args(argv)
    traces = [0]
    train_step = keras_tf_trainer.TensorFlowTrainer.train_step

    def counted(self, data):
        traces[0] += 1
        return train_step(self, data)

    keras_tf_trainer.TensorFlowTrainer.train_step = counted
    data = load_digits(seed=42)
    split = train_module.validation_splits(data.x_train, data.y_train, 1, 0.2, seed=0)[0]
    made = train_module.make_training_state
    out = {}
    for side, state in (("made_first", made), ("left_to_the_fit", lambda model, shape: None)):
        train_module.make_training_state = state
        seconds, traces[0] = [], 0
        for _ in range(args.fits):
            start = cpu()
            train_module.train(PARAMS, split, data.input_shape, data.n_classes, epochs=2)
            seconds.append(cpu() - start)
        out[f"{side}_cpu_s"] = round(sum(seconds[1:]) / (len(seconds) - 1), 3)
        out[f"{side}_traces_per_fit"] = traces[0] / args.fits
    train_module.make_training_state = made
    out["ratio"] = round(out["made_first_cpu_s"] / out["left_to_the_fit_cpu_s"], 2)
    print(result_line(out))
    return out


if __name__ == "__main__":
    main()

"""An epoch of one configuration on each Keras backend, measured in one run on this CPU.

    python bench/backend_epoch.py --dataset ../shared/data/cifar10-sample --epochs 3 \
        [--backends tensorflow jax torch] [--config search_spaces/airbench_start.yaml:airbench94]

Each backend trains in its own process (the backend is fixed when Keras is imported), one
after the other, with the pipeline's `train` on the pipeline's validation split: the same
configuration (by default the CIFAR-10 recipe's warm start, airbench94's network), data and
seed. JAX trains jit-compiled (Keras' default there); TensorFlow and PyTorch as the pipeline
runs them (no XLA on a CPU, PyTorch eager). `--extra-path DIR` goes on the children's
PYTHONPATH (e.g. a `pip install --target DIR torch==2.13.0` beside the venv). Prints per
backend its epoch seconds (median after the first, tracing epoch) and validation accuracy,
then `name=value` pairs: `<backend>_epoch_s`, `<backend>_val_accuracy`, and
`<backend>_ratio`, its epoch time over the fastest backend's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ROOT, EpochClock, result_line


def child(args) -> None:
    """Train in this process, on the backend KERAS_BACKEND names; print one JSON line."""
    import keras

    from pipeline.data import load_dataset
    from pipeline.train import train, validation_splits
    from pipeline.warm_start import load_configurations

    path, _, name = args.config.partition(":")
    _, configs = load_configurations(ROOT / path, only=[name] if name else [])
    params = next(iter(configs.values()))
    data = load_dataset(args.dataset)
    split = validation_splits(data.x_train, data.y_train, 1, 0.2, 42)[0]
    clock = EpochClock()
    metrics = train(params, split, data.input_shape, data.n_classes, epochs=args.epochs, patience=args.epochs,
                    callbacks=[clock])
    print(json.dumps({"backend": keras.backend.backend(), "epochs": [round(float(s), 2) for s in clock.fits[-1]],
                      "epoch_s": round(clock.steady(), 2), "val_accuracy": round(metrics["val_accuracy"], 4),
                      "train_images": len(split.train_rows)}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/cifar10-sample")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backends", nargs="*", default=["tensorflow", "jax", "torch"])
    ap.add_argument("--config", default="search_spaces/airbench_start.yaml:airbench94",
                    help="a warm-start or baselines file and the configuration's name in it")
    ap.add_argument("--extra-path", default="", help="put on the children's PYTHONPATH (after the project)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    out, rows = {}, {}
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend,
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), args.extra_path) if p)}
        cmd = [sys.executable, __file__, "--child", "--dataset", args.dataset, "--epochs", str(args.epochs),
               "--config", args.config]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"{backend}: exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}", flush=True)
            continue
        rows[backend] = json.loads(lines[-1])
        print(backend, "epoch seconds:", rows[backend]["epochs"], "val_accuracy:", rows[backend]["val_accuracy"],
              "train images:", rows[backend]["train_images"], flush=True)
    fastest = min((r["epoch_s"] for r in rows.values()), default=None)
    for backend, r in rows.items():
        out.update({f"{backend}_epoch_s": r["epoch_s"], f"{backend}_val_accuracy": r["val_accuracy"],
                    f"{backend}_ratio": round(r["epoch_s"] / fastest, 2)})
    print(result_line(out))


if __name__ == "__main__":
    main()

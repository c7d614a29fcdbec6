"""Overhead of the pipeline over bare Keras: the same model on the same data, trained
(a) by a bare `model.fit` on the numpy arrays and (b) as a one-trial search of the pipeline
(`pipeline.core.run_study`: pruning callback, MLflow logging to a temp SQLite store,
Optuna SQLite storage, early stopping), interleaved a, b, a, b, ...

    python bench/overhead.py                          # digits, under a minute
    python bench/overhead.py --dataset ../shared/data/cifar10-sample --epochs 3 --repeats 3
    python bench/overhead.py --dataset ../shared/data/cifar10-sample --epochs 3 --repeats 2 \
        --warm-start search_spaces/cifar10_start.yaml     # the CIFAR-10 recipe's net

`--system-metrics 1` turns on MLflow's system-metrics monitor for the pipeline's trials, to
measure what `system_metrics=1` costs. Per-epoch wall time is measured from one epoch's start
to the next (every callback's end-of-epoch work included), first (tracing) epoch left out;
the figure is the median over repeats. Also reported: the whole-trial ratio (`trial_ratio`),
Optuna's start-to-end time of the trial (sampling, MLflow run, model build, fit, logging) over
the bare model's build + fit, which counts the per-trial fixed costs the per-epoch figure
leaves out. Each repeat of (b) is a fresh study, so its single trial has the same seed
as (a) and trains the same weights. Last line: `name=value` pairs ending with
`overhead_ratio=<b/a>` (target <= 1.05). `--warm-start FILE` trains the first configuration
of a warm-start file (in its own space) instead of the default fixed model. Both sides also
report `cpu_utilization`: the process's user + system CPU seconds over wall seconds over
cores, for the whole fit (a) or trial (b), median over repeats.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from common import EpochClock, fixed_space, result_line, temp_stores

import numpy as np  # noqa: E402

from pipeline.config import Settings  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.train import scheduled_model  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime



def bare_fit(params, x, y, x_val, y_val, data, epochs, seed, clock):
    """(a): what a user writes without the pipeline (a schedule spanning the fit)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = scheduled_model(params, data.input_shape, data.n_classes, len(y), epochs)
    model.fit(x, y, validation_data=(x_val, y_val), epochs=epochs, batch_size=params["batch_size"],
              callbacks=[clock], verbose=0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--system-metrics", type=int, default=0, help="1: the pipeline side logs MLflow system metrics")
    ap.add_argument("--warm-start", default="", help="train the first configuration of this warm-start file")
    args = ap.parse_args(argv)

    from pipeline.core import run_study
    from pipeline.space import load_space
    from pipeline.train import validation_splits
    from pipeline.warm_start import load_configurations, read_file

    data = load_dataset(args.dataset, args.seed)
    a_epoch, b_epoch, a_fit, b_trial, a_cpu, b_cpu = [], [], [], [], [], []
    with temp_stores() as tmp:
        warm = {}
        if args.warm_start:
            space_file = read_file(args.warm_start)[0]
            warm = dict([next(iter(load_configurations(args.warm_start)[1].items()))])
        else:
            space_file = fixed_space(tmp)
        space = load_space(space_file)
        base = Settings(dataset=args.dataset, search_space=str(space_file), n_trials=1, epochs=args.epochs,
                        storage=f"sqlite:///{tmp}/optuna.db", seed=args.seed, patience=args.epochs,
                        experiment_name="bench-overhead", system_metrics=args.system_metrics)
        split = validation_splits(data.x_train, data.y_train, 1, base.val_fraction, base.seed)[0]  # the trial's
        x, y = data.x_train[split.train_rows], data.y_train[split.train_rows]
        x_val, y_val = data.x_train[split.val_rows], data.y_train[split.val_rows]
        params = next(iter(warm.values())) if warm else _fixed_params(space)
        clock = EpochClock()
        for r in range(args.repeats):
            settings = base.replace(study_name=f"overhead-{r}")
            start, cpu = time.perf_counter(), cpu_seconds()
            bare_fit(params, x, y, x_val, y_val, data, args.epochs, args.seed, clock)
            a_fit.append(time.perf_counter() - start)
            a_cpu.append((cpu_seconds() - cpu) / a_fit[-1] / os.cpu_count())
            a_epoch.append(clock.steady())

            start, cpu = time.perf_counter(), cpu_seconds()
            study = run_study("search", settings, data, space, warm=warm, callbacks=[clock]).study
            b_cpu.append((cpu_seconds() - cpu) / (time.perf_counter() - start) / os.cpu_count())
            trial = study.trials[-1]  # Optuna's own clock: from the trial's creation to its end
            b_trial.append((trial.datetime_complete - trial.datetime_start).total_seconds())
            b_epoch.append(clock.steady())
            print(f"repeat {r + 1}: bare {a_epoch[-1]:.3f} s/epoch, pipeline {b_epoch[-1]:.3f} s/epoch; "
                  f"whole fit {a_fit[-1]:.2f} s, whole trial {b_trial[-1]:.2f} s", flush=True)
    med = lambda v: float(np.median(v))  # noqa: E731
    out = {
        "dataset": args.dataset, "epochs": args.epochs, "repeats": args.repeats,
        "bare_epoch_s": med(a_epoch), "pipeline_epoch_s": med(b_epoch),
        "system_metrics": args.system_metrics, "bare_fit_s": med(a_fit), "pipeline_trial_s": med(b_trial),
        "trial_ratio": med(b_trial) / med(a_fit),
        "bare_cpu_utilization": med(a_cpu), "pipeline_cpu_utilization": med(b_cpu),
        "overhead_ratio": med(b_epoch) / med(a_epoch),
    }
    print(result_line(out))
    return out


def _fixed_params(space) -> dict:
    """The params of a space whose settings are all fixed (no trial needed)."""
    import optuna

    return space.sample(optuna.trial.FixedTrial({}))


if __name__ == "__main__":
    main()

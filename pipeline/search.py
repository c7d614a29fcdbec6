"""The search: a thin Optuna objective around `train`, and the loop that spends the budget.

`Objective` holds the data (split once, in memory) and per trial: samples params from the
space, opens the trial's MLflow run, trains each fold with pruning and logging callbacks,
and returns the mean validation score. The test split is never touched here.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import optuna
from optuna_integration import KerasPruningCallback

from pipeline.study import COUNTED, counted_trials
from pipeline.train import train, validation_splits


class FoldPruning(KerasPruningCallback):
    """KerasPruningCallback whose steps continue across CV folds (fold k starts at k * epochs)."""

    def __init__(self, trial, monitor: str, step_offset: int = 0):
        super().__init__(trial, monitor)
        self.step_offset = step_offset

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + self.step_offset, logs)


class Objective:
    """`callbacks`: extra Keras callbacks for every fit (a timer, say), after the pipeline's own."""

    def __init__(self, data, space, settings, tracker, callbacks=()):
        self.data, self.space, self.settings, self.tracker = data, space, settings, tracker
        self.extra_callbacks = list(callbacks)
        self.splits = validation_splits(data.x_train, data.y_train, settings.cv_folds, settings.val_fraction, settings.seed)

    def __call__(self, trial: optuna.Trial) -> float:
        s = self.settings
        params = self.space.sample(trial)
        if s.batch_size:  # the opt-in override (a GPU wants larger batches) is what trains
            params["batch_size"] = s.batch_size
        trial.set_user_attr("params", params)
        with self.tracker.trial_run(trial, params) as run_id:
            folds = []
            for k, split in enumerate(self.splits):
                offset = k * s.epochs
                callbacks = [self.tracker.epoch_logger(run_id, offset)]
                if s.pruner != "none":
                    callbacks.append(FoldPruning(trial, s.metric, offset))
                callbacks += self.extra_callbacks
                folds.append(
                    train(params, split, self.data.input_shape, self.data.n_classes, epochs=s.epochs,
                          monitor=s.metric, direction=s.direction, patience=s.patience,
                          callbacks=callbacks, seed=s.seed + trial.number)
                )
            value = float(np.mean([f[s.metric] for f in folds]))
            if not math.isfinite(value):
                raise ValueError(f"{s.metric} is {value}")
            summary = {
                "trial_value": value,
                "epochs_needed": int(round(float(np.median([f["epochs_needed"] for f in folds])))),
                "epochs_run": int(sum(f["epochs_run"] for f in folds)),
                "params_count": folds[0]["params_count"],
            }
            for key, v in summary.items():
                trial.set_user_attr(key, v)
            self.tracker.log_metrics(run_id, summary)
        return value


def run_search(study: optuna.Study, objective: Objective, settings) -> None:
    """Spend the study's global trial budget (shared by all workers) within `timeout`."""
    remaining = settings.n_trials - counted_trials(study)
    if remaining <= 0:
        print(f"study {study.study_name!r} already has {settings.n_trials} finished trials; nothing to search")
        return
    # Objects alive now (modules, data, stores) live for the whole search: freezing them
    # keeps the garbage collection after each trial from rescanning them (~0.3 s a trial).
    gc.collect()
    gc.freeze()
    try:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=settings.timeout or None,
            callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=COUNTED)],
            gc_after_trial=True,
        )
    finally:
        gc.unfreeze()

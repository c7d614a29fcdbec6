"""The search: a thin Optuna objective around `train`, and the loop that spends the budget.

`Objective` holds the data (split once, in memory: an image folder's validation folder is
the validation split, pipeline.train.validation_splits; each fold's `class_weight` is
computed from its training rows) and per trial: records which process
runs it, closes the MLflow runs of trials whose worker died, samples params from the space,
opens the trial's MLflow run (with the training and validation rows as its datasets),
trains each fold with pruning and logging callbacks, and
returns the mean validation score, followed by the parameter count and/or the measured
inference latency per image in a multi-objective study. The test split is never touched here.

In a study with rungs (`pipeline.budget.rungs`) a trial is one evaluation of successive
halving: it trains its rung's epochs unpruned, records its rung and fidelity, and a promotion
another trial already trains is failed untrained. With equal-time rungs an evaluation is given
its rung's seconds, and its epochs follow from its configuration's epoch cost: measured by the
study's earlier evaluations of a configuration of the same cost (`cost_key`), else by a short
probe of this one (EVALUATION_PROBE batches), kept in the study (`epoch_costs`) for every
worker and updated from each complete evaluation. Every evaluation of such a study trains from
the same seed, so the default and its challengers differ only in their configuration.

`run_search` first recovers the trials of dead workers (`pipeline.recover`), then runs
trials one `study.optimize` call at a time (Optuna's heartbeat, stale-trial check and tell
each time) until the study, all workers together, has `n_trials` complete or pruned ones:
no trial starts after the study-wide deadline (`timeout`), and none that could not finish
before a time budget's search share ends (`until`). With rungs, each complete evaluation
enqueues the promotions it makes due.
"""

from __future__ import annotations

import gc
import math
import os
import time

import numpy as np
import optuna
from optuna_integration import KerasPruningCallback

from pipeline import names
from pipeline.budget.plan import BOOKKEEPING, VALIDATION_COST, Cost, cost_key, epochs_in, evaluation_seconds
from pipeline.budget.prior import default_holds
from pipeline.budget.probe import probe
from pipeline.budget.rungs import DuplicatePromotion, duplicate_of, next_rung, promote, rung_of, study_rungs
from pipeline.config import Settings
from pipeline.model import LATENCY_IMAGES, latency_ms
from pipeline.recover import HOST, mark_owner, recover, settle
from pipeline.study import counted_trials, deadline
from pipeline.terminal import progress_bar
from pipeline.tracking import Tracker, log_datasets, log_metrics
from pipeline.train import KeepModel, StopAt, class_weights, train, validation_splits

DEADLINE_MARGIN = 0.1  # seconds: stop starting trials this much before the deadline (Optuna's own clock starts later)
EVALUATION_PROBE = (2, 5)  # batches untimed, then timed, of an evaluation whose configuration's cost is not known


class FoldPruning(KerasPruningCallback):
    """KerasPruningCallback whose steps continue across CV folds (fold k starts at k * epochs).

    At `last_step` (the trial's final epoch of its final fold) it only reports: a trial pruned
    there has trained all it would, and its finished result would be thrown away (seen in
    bench/search_vs_random.py, 2026-11-26: 3 of 25 trials pruned at their last epoch). With
    `prune=False` (warm-start trials) it only reports: a known configuration is trained to the
    end and serves the pruner as a reference for the trials after it.
    """

    def __init__(self, trial, monitor: str, step_offset: int = 0, prune: bool = True, last_step: int = -1):
        super().__init__(trial, monitor)
        self.step_offset, self.prune, self.last_step = step_offset, prune, last_step

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + self.step_offset
        if self.prune and step != self.last_step:
            super().on_epoch_end(step, logs)
        elif self._monitor in (logs or {}):
            self._trial.report(float(logs[self._monitor]), step=step)


class Objective:
    """`callbacks`: extra Keras callbacks for every fit (a timer, say), after the pipeline's own.
    `rungs`: epochs per rung of a study with successive halving (pipeline.budget.rungs): each
    evaluation trains its rung's epochs, unpruned; [] = plain trials of `epochs`, pruned.
    `until`: epoch seconds at which a time budget's search share ends (`run_search` sets it): a
    fit still training then is cut short (a configuration far slower than the ones before it
    must not eat the refit's time), and its trial pruned (`cut` says where) unless the study has
    no complete trial yet, when it completes with what it reached, so that the refit has one."""

    def __init__(self, data, space, settings: Settings, tracker: Tracker, callbacks=()):
        self.data, self.space, self.settings, self.tracker = data, space, settings, tracker
        self.extra_callbacks, self.rungs = list(callbacks), []  # the rungs: set once the study's are fixed
        self.seconds: list[float] = []  # equal-time rungs: seconds per rung (set with the rungs)
        self.until: float | None = None
        self.splits = validation_splits(data.x_train, data.y_train, settings.cv_folds, settings.val_fraction, settings.seed,
                                        data.val_rows)
        x, y = data.x_train, data.y_train
        self.class_weights = [class_weights(settings.class_weight, y[split.train_rows], data.n_classes)
                              for split in self.splits]
        self.inputs = [(data.lineage(x, y, rows), context) for split in self.splits
                       for rows, context in ((split.train_rows, "training"), (split.val_rows, "validation"))]

    @property
    def rows(self) -> tuple[int, int]:
        """(training, validation) images of one fold's fit."""
        return len(self.splits[0].train_rows), len(self.splits[0].val_rows)

    def epochs(self, rung: int | None) -> int:
        """What one fold of an evaluation trains: its rung's epochs, or the trial cap `epochs`."""
        return self.rungs[rung] if self.rungs and rung is not None else self.settings.epochs

    def epoch_cost(self, study: optuna.Study, params: dict) -> tuple[float, float]:
        """(setup seconds, seconds an epoch with its validation) of `params` on one fold: the
        study's record for its cost key, else a short probe of it, recorded."""
        key = cost_key(params)
        known = study.user_attrs.get(names.COSTS, {})
        if key not in known:
            warmup, batches = EVALUATION_PROBE
            cost = probe(params, self.data.x_train, self.data.y_train, self.splits[0].train_rows, self.data.input_shape,
                         self.data.n_classes, seed=self.settings.seed, warmup=warmup, batches=batches)
            epoch = cost.epoch(self.rows[0]) + VALIDATION_COST * cost.epoch(self.rows[1])
            _record_cost(study, key, cost.setup, epoch)
            return cost.setup, epoch
        return tuple(known[key])

    def _fidelity(self, trial: optuna.Trial, params: dict) -> dict | None:
        """The rung and what the evaluation trains, as trial user attrs; None without rungs.
        A promotion another trial already makes is not trained (DuplicatePromotion)."""
        if not self.rungs:
            return None
        twin = duplicate_of(trial.study, trial)
        if twin is not None:
            trial.set_user_attr(names.FAIL_REASON, f"duplicate promotion: trial {twin} trains it")
            raise DuplicatePromotion(f"trial {twin} makes the same promotion")
        rung = rung_of(trial)
        epochs = self.epochs(rung)
        fidelity = {names.RUNG: rung}
        if self.seconds:
            setup, epoch = self.epoch_cost(trial.study, params)
            epochs = epochs_in(self.seconds[rung] - BOOKKEEPING, setup, epoch)
            fidelity.update({names.FIDELITY_SECONDS: self.seconds[rung], names.COST_KEY: cost_key(params)})
        fidelity.update({names.FIDELITY_EPOCHS: epochs, names.FIDELITY_ROWS: self.rows[0],
                         names.FIDELITY_VAL_ROWS: self.rows[1]})
        if names.PROMOTED_FROM in trial.user_attrs:
            fidelity[names.PROMOTED_FROM] = trial.user_attrs[names.PROMOTED_FROM]
        for key, value in fidelity.items():
            trial.set_user_attr(key, value)
        return fidelity

    def __call__(self, trial: optuna.Trial) -> float | tuple:
        s = self.settings
        mark_owner(trial)
        params = self.space.sample(trial)
        if s.batch_size:  # the opt-in override (a GPU wants larger batches) is what trains
            params["batch_size"] = s.batch_size
        fidelity = self._fidelity(trial, params)
        epochs = fidelity[names.FIDELITY_EPOCHS] if fidelity else self.epochs(None)
        trial.set_user_attr(names.PARAMS, params)
        with self.tracker.trial_run(trial, params, fidelity) as run_id:
            log_datasets(self.tracker.client, run_id, self.inputs)
            folds, keep, start = [], KeepModel(), time.perf_counter()
            stop = StopAt(self.until, label=None) if self.until is not None else None
            for k, split in enumerate(self.splits):
                offset = k * epochs
                callbacks = [self.tracker.epoch_logger(run_id, offset), keep, *([stop] if stop else [])]
                if s.pruning and not self.rungs:
                    callbacks.append(FoldPruning(trial, s.metric, offset, prune=names.WARM_START not in trial.user_attrs,
                                                 last_step=len(self.splits) * epochs - 1))
                callbacks += self.extra_callbacks
                folds.append(
                    train(params, split, self.data.input_shape, self.data.n_classes, epochs=epochs,
                          monitor=s.metric, direction=s.direction, patience=s.patience,
                          callbacks=callbacks, seed=s.seed if self.seconds else s.seed + trial.number,
                          class_weight=self.class_weights[k])
                )
                if stop and stop.stopped:
                    self._cut(trial, f"the search's share of the time budget ended: fold {k + 1}, {stop.where}")
                    break
            value = float(np.mean([f[s.metric] for f in folds]))
            if not math.isfinite(value):
                raise ValueError(f"{s.metric} is {value}")
            summary = {
                "trial_value": value,
                names.EPOCHS_NEEDED: int(round(float(np.median([f["epochs_needed"] for f in folds])))),
                names.EPOCHS_RUN: int(sum(f["epochs_run"] for f in folds)),
                names.FIT_SECONDS: time.perf_counter() - start,
            }
            if names.LATENCY_MS in s.objective_names:
                summary[names.LATENCY_MS] = latency_ms(keep.model, self.data.x_train[self.splits[0].val_rows[:LATENCY_IMAGES]])
            for key, v in summary.items():
                trial.set_user_attr(key, v)
            if self.seconds and not (stop and stop.stopped):  # what this configuration's epochs measurably cost
                setup = self.epoch_cost(trial.study, params)[0]
                per_fold = summary[names.FIT_SECONDS] / len(folds)
                _record_cost(trial.study, cost_key(params), setup, max(0.0, per_fold - setup) / epochs)
            log_metrics(self.tracker.client, run_id, summary)
            trial.set_user_attr(names.PARAMS_COUNT, folds[0]["params_count"])  # the metric: EpochLogger
        if not s.multi_objective:
            return value
        extra = {"params": folds[0]["params_count"], names.LATENCY_MS: summary.get(names.LATENCY_MS)}
        return (value, *(float(extra[name]) for name in s.objective_names[1:]))

    @staticmethod
    def _cut(trial: optuna.Trial, where: str) -> None:
        """A fit cut short at the search's end: pruned, unless no trial of the study is complete."""
        trial.set_user_attr(names.CUT, where)
        done = _has_result(trial.study)
        print(f"trial {trial.number}: cut short, {where}" + ("" if done else "; kept, the study has no other result"),
              flush=True)
        if done:
            raise optuna.TrialPruned(where)


def _record_cost(study: optuna.Study, key: str, setup: float, epoch: float) -> None:
    """Keep (setup, epoch) seconds as the study's record for configurations of cost `key`."""
    costs = dict(study.user_attrs.get(names.COSTS, {}))
    costs[key] = [round(setup, 3), round(epoch, 3)]
    study.set_user_attr(names.COSTS, costs)


def _has_result(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _history(study: optuna.Study) -> list[tuple[int, float]]:
    """(epochs run, seconds) of the study's complete evaluations, this process's if it has any,
    oldest first: what the next evaluation's duration is estimated from."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if names.EPOCHS_RUN in t.user_attrs and t.datetime_start and t.datetime_complete]
    mine = [t for t in done if t.user_attrs.get(names.WORKER_PID) == os.getpid() and t.user_attrs.get(names.WORKER_HOST) == HOST]
    return [(t.user_attrs[names.EPOCHS_RUN], (t.datetime_complete - t.datetime_start).total_seconds())
            for t in sorted(mine or done, key=lambda t: t.number)]


def _no_time(study: optuna.Study, objective: Objective, until: float | None, cost: Cost | None) -> str | None:
    """Why the next evaluation should not start before `until` (None: it may): it could not
    finish by then, as far as this machine's evaluations so far (or the probe) tell. A study with
    no complete trial starts one whatever the time, so that a refit has a configuration (a slow
    machine's probe can leave a small budget's search too little time for one evaluation)."""
    if until is None or not _has_result(study):
        return None  # cut at `until`, it is kept
    rung = next_rung(study) if objective.rungs else None
    epochs = objective.epochs(rung) * objective.settings.cv_folds
    if objective.seconds:  # an equal-time evaluation takes its rung's seconds
        seconds = objective.seconds[rung] * objective.settings.cv_folds + BOOKKEEPING
    else:
        seconds = evaluation_seconds(epochs, _history(study), cost, *objective.rows) or 0.0
    left = until - time.time() - DEADLINE_MARGIN
    if seconds <= left:
        return None
    what = f"rung {rung}, {epochs} epoch(s)" if rung is not None else f"{epochs} epoch(s)"
    if objective.seconds:
        what = f"rung {rung}, {objective.seconds[rung]:.0f} s"
    return f"the next evaluation ({what}, about {seconds:.0f} s) cannot finish in the {max(0.0, left):.0f} s left"


def run_search(study: optuna.Study, objective: Objective, settings: Settings, *, until: float | None = None,
               cost: Cost | None = None) -> None:
    """Spend the study's global trial budget (shared by all workers) before the study-wide
    deadline (`timeout`: no trial starts after it; one running at it finishes) and before `until`
    (a time budget's search share: no evaluation starts that could not finish by then, by
    `cost`, the probe, until this machine's own evaluations tell better). With rungs, each
    finished evaluation enqueues the promotions it makes due. Before each evaluation the
    trials of dead workers are failed, requeued and their runs closed (`recover`, which says
    so), ahead of Optuna's own silent check in `optimize`."""
    tracker = objective.tracker
    objective.until = until
    recover(study, tracker.client, tracker.experiment_id)
    if counted_trials(study) >= settings.n_trials:
        print(f"study {study.study_name!r} already has {settings.n_trials} finished trials; nothing to search")
        return
    deadline_at = deadline(study, settings.timeout)
    if deadline_at is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline_at))
        if deadline_at - time.time() <= DEADLINE_MARGIN:
            print(f"study {study.study_name!r} passed its deadline {stamp}; no trial started (timeout=0 lifts it)")
            return
        print(f"study {study.study_name!r}: no trial starts after {stamp}")
    callbacks = []
    eta = study_rungs(study)[1]
    if objective.rungs:
        callbacks.append(lambda st, t: t.state == optuna.trial.TrialState.COMPLETE and promote(st, objective.rungs, eta))
    ends = [t for t in (deadline_at, until) if t is not None]
    # Objects alive now (modules, data, stores) live for the whole search: freezing them
    # keeps the garbage collection after each trial from rescanning them (~0.3 s a trial).
    # A process that froze its libraries itself (pipeline.process, the test session) keeps
    # everything frozen after; any other gets its objects back when the search ends.
    thaw = not gc.get_freeze_count()
    gc.collect()
    gc.freeze()
    try:
        with progress_bar(study, settings, min(ends) if ends else None) as bar:
            while counted_trials(study) < settings.n_trials:
                if deadline_at is not None and deadline_at - time.time() <= DEADLINE_MARGIN:
                    break
                if reason := _no_time(study, objective, until, cost):
                    bar.bar.write(f"search: {reason}; no more evaluations start")
                    break
                if objective.seconds and default_holds(study, len(objective.rungs) - 1, eta, settings.sign):
                    bar.bar.write(f"search: the default leads the top rung against {eta} or more challengers; "
                                  "the search's remaining time goes to the refit")
                    break
                recover(study, tracker.client, tracker.experiment_id)
                study.optimize(objective, n_trials=1, callbacks=[bar, *callbacks], gc_after_trial=True,
                               catch=(DuplicatePromotion,))
    finally:
        if thaw:
            gc.unfreeze()
    settle(study, tracker.client, tracker.experiment_id, settings)

"""Successive halving on a shared Optuna study: rungs of rising epochs, each evaluation one trial.

A study with rungs stores them once (study attrs `rungs`, e.g. [1, 3, 9], and `eta`), so every
worker and every resume uses the same. Each evaluation is a complete training run of its rung's
epochs, with a schedule that spans them (no pruning inside it):
- rung 0: a configuration the sampler proposes, or a warm start;
- rung r + 1: the configuration of one of the top 1/eta of rung r's complete evaluations, trained
  afresh (asynchronous successive halving, ASHA, Li et al. 2020). After each evaluation the worker
  that ran it reads the study and enqueues every promotion now due as a WAITING trial with user
  attrs `rung` and `promoted_from`; whichever worker asks next takes it (Optuna pops waiting
  trials first, and popping is atomic), so workers that join late pick up open promotions.
- Two workers deciding at the same moment can enqueue one promotion twice: the copy taken second
  is never trained (`duplicate_of`; it fails at once with fail_reason "duplicate promotion ...",
  which the budget does not count).
- A killed worker's evaluation is failed and queued again by the usual recovery; its user attrs,
  the rung with them, come along, so the retry trains the same rung.
A study without the attrs, or with `rungs` [], has plain trials, as before rungs existed.

Equal-time rungs (study attr `rung_seconds`, planned under a time budget): an evaluation of rung
r is given `rung_seconds[r]` seconds, and its epochs follow from its configuration's epoch cost
(pipeline.search); `rungs` then holds the probed configuration's epochs at each, for reading.
The space's default (the control, user attr `control`) is promoted first, whatever its rank,
whenever a rung promotes any evaluation: it is the first evaluation of every rung, so the refit
can compare each challenger with it at equal time (pipeline.budget.prior).

The sampler learns from one rung at a time, as BOHB does (Falkner et al. 2018): `RungSampler` shows
it only the evaluations of the highest rung with at least `startup` complete ones, else rung 0.
"""

from __future__ import annotations

import optuna

from pipeline import names
from pipeline.errors import PipelineError

COMPLETE, FAIL, WAITING = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING


class DuplicatePromotion(PipelineError):
    """This evaluation repeats a promotion another trial already makes: not trained (a
    PipelineError: Optuna's warning about the failed trial is one line, pipeline.quiet)."""


def check_rungs(study: optuna.Study, wanted: list[int] | None) -> None:
    """A one-line error where the `rungs` setting asks a study for other rungs than it has (or
    for rungs in a study made without them); before any run is touched."""
    if wanted is None:
        return
    stored = study.user_attrs.get(names.RUNGS)
    if stored is None and wanted and _has_run(study):
        raise PipelineError(f"rungs={','.join(map(str, wanted))}: study {study.study_name!r} was made without "
                            "rungs; use another study_name")
    if stored is not None and wanted != stored:
        raise PipelineError(f"rungs={','.join(map(str, wanted)) or 'off'}: study {study.study_name!r} has rungs "
                            f"{','.join(map(str, stored)) or 'off'}; use another study_name")


def fix_rungs(study: optuna.Study, wanted: list[int] | None, planned: list[int], eta: int,
              seconds: list[float] = ()) -> list[int]:
    """The study's rungs: those it stores, else `wanted` (the `rungs` setting; None: `planned`,
    with the planned equal-time `seconds` where given), stored now. A study that already has
    trials but no rungs keeps plain trials."""
    check_rungs(study, wanted)
    stored = study.user_attrs.get(names.RUNGS)
    if stored is None:
        rungs = wanted if wanted is not None else planned
        if rungs and _has_run(study):
            print(f"study {study.study_name!r} was made without rungs: it keeps plain trials")
            rungs = []
        if wanted is None and rungs and seconds:
            study.set_user_attr(names.RUNG_SECONDS, list(seconds))
        study.set_user_attr(names.RUNGS, rungs)
        study.set_user_attr(names.ETA, eta)
        stored = study.user_attrs[names.RUNGS]  # a worker that wrote at the same moment may have won
    return list(stored)


def _has_run(study: optuna.Study) -> bool:
    """Whether any trial has started: warm starts only enqueued do not make a study old."""
    return any(t.state != WAITING for t in study.get_trials(deepcopy=False))


def study_rungs(study: optuna.Study) -> tuple[list[int], int]:
    """(epochs per rung, eta) of a study; ([], eta) without rungs."""
    attrs = study.user_attrs
    return list(attrs.get(names.RUNGS) or []), int(attrs.get(names.ETA, 3))


def rung_of(trial) -> int:
    return int(trial.user_attrs.get(names.RUNG, 0))


def rung_seconds(study: optuna.Study) -> list[float]:
    """Seconds per rung of a study with equal-time rungs ([] otherwise: epochs per rung, or none)."""
    return list(study.user_attrs.get(names.RUNG_SECONDS) or [])


def is_control(trial) -> bool:
    return bool(trial.user_attrs.get(names.CONTROL))


def _sign(study: optuna.Study) -> int:
    return 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1


def due_promotions(study: optuna.Study, rungs: list[int], eta: int) -> list[tuple[optuna.trial.FrozenTrial, int]]:
    """(evaluation, next rung) for every evaluation in the top 1/eta of its rung's complete ones
    that no trial of the next rung trains yet; the highest rungs first, the best first."""
    trials = study.get_trials(deepcopy=False)
    promoted = {(rung_of(t), t.user_attrs[names.PROMOTED_FROM]) for t in trials if names.PROMOTED_FROM in t.user_attrs}
    due = []
    for rung in reversed(range(len(rungs) - 1)):
        done = sorted((t for t in trials if t.state == COMPLETE and rung_of(t) == rung),
                      key=lambda t: (-_sign(study) * t.values[0], t.number))
        top = done[: len(done) // eta]
        control = [t for t in done if is_control(t)]
        if top and control:  # the control goes up first whenever the rung promotes anything
            top = control + [t for t in top if not is_control(t)]
        due += [(t, rung + 1) for t in top if (rung + 1, t.number) not in promoted]
    return due


def promote(study: optuna.Study, rungs: list[int], eta: int) -> list[int]:
    """Enqueue the promotions now due; returns the trial numbers promoted."""
    due = due_promotions(study, rungs, eta)
    for trial, rung in due:
        attrs = {names.RUNG: rung, names.PROMOTED_FROM: trial.number}
        for key in (names.WARM_START, names.CONTROL):
            if key in trial.user_attrs:
                attrs[key] = trial.user_attrs[key]
        study.enqueue_trial(trial.params, user_attrs=attrs)
    return [t.number for t, _ in due]


def duplicate_of(study: optuna.Study, trial) -> int | None:
    """The number of an earlier trial, not failed, that makes the same promotion as `trial`, if any."""
    source = trial.user_attrs.get(names.PROMOTED_FROM)
    if source is None:
        return None
    key = (rung_of(trial), source)
    for other in study.get_trials(deepcopy=False):
        if (other.number < trial.number and other.state != FAIL and other.user_attrs.get(names.PROMOTED_FROM) is not None
                and (rung_of(other), other.user_attrs[names.PROMOTED_FROM]) == key):
            return other.number
    return None


def next_rung(study: optuna.Study) -> int:
    """The rung of the evaluation this worker would take next: the first waiting trial's, else 0."""
    waiting = study.get_trials(deepcopy=False, states=(WAITING,))
    return rung_of(min(waiting, key=lambda t: t.number)) if waiting else 0


def best_rung(study: optuna.Study) -> int | None:
    """The highest rung with a complete evaluation (None: none complete)."""
    rungs = {rung_of(t) for t in study.get_trials(deepcopy=False, states=(COMPLETE,))}
    return max(rungs) if rungs else None


class RungView:
    """A study as the sampler sees it: only the trials of one rung."""

    def __init__(self, study: optuna.Study, rung: int):
        self._study, self._rung = study, rung

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        return [t for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
                if rung_of(t) == self._rung]

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self):
        return self.get_trials()


class RungSampler(optuna.samplers.BaseSampler):
    """`base` learning from one rung of a study with rungs: the highest with at least `startup`
    complete evaluations (else rung 0). A study without rungs is passed through unchanged."""

    def __init__(self, base: optuna.samplers.BaseSampler, startup: int):
        self.base, self.startup = base, startup
        self._rungs: list[int] | None = None
        self._views: tuple[int, object] | None = None  # (trial number, its view): one study read a trial

    def _view(self, study, trial):
        if self._views is None or self._views[0] != trial.number:
            self._views = (trial.number, self._make_view(study))
        return self._views[1]

    def _make_view(self, study):
        if self._rungs is None:
            self._rungs = study.user_attrs.get(names.RUNGS)
        if not self._rungs:
            return study
        counts = {}
        for t in study._get_trials(deepcopy=False, states=(COMPLETE,), use_cache=False):
            counts[rung_of(t)] = counts.get(rung_of(t), 0) + 1
        rung = max([r for r, n in counts.items() if n >= self.startup], default=0)
        return RungView(study, rung)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study, trial, search_space):
        return self.base.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

"""Which trial is best: the one function that picks the trial to refit (and to show).

A single-objective study's best trial; in a multi-objective study, the Pareto trial that
`select` picks: `select=max_params=50000` (and/or `max_latency_ms=...`) keeps the Pareto
trials within every limit, then takes the best by the metric; no rule means the best by the
metric. A study with rungs (pipeline.budget.rungs): the best evaluation of the highest rung reached;
where the study evaluated the space's default (the control), the default unless a challenger beats
it there by more than the noise of the validation rows (pipeline.budget.prior.control_verdict).
"""

from __future__ import annotations

import optuna

from pipeline.budget.prior import Verdict, control_verdict
from pipeline.budget.rungs import COMPLETE, best_rung, is_control, rung_of, study_rungs
from pipeline.config import Settings
from pipeline.errors import PipelineError


def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto-optimal complete trials, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)


def best_trial(study: optuna.Study, settings: Settings) -> optuna.trial.FrozenTrial:
    """The trial to refit; a one-line error when there is none (or no Pareto trial meets `select`).
    In a study with rungs: the best evaluation of the highest rung reached."""
    sign = settings.sign
    if not settings.multi_objective and study_rungs(study)[0] and (top := best_rung(study)) is not None:
        verdict = verdict_of(study, settings)
        above = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
                 if rung_of(t) > verdict.rung and not is_control(t)] if verdict is not None else []
        if verdict is not None and not above:  # no challenger went further than the comparison
            return verdict.chosen
        trials = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if rung_of(t) == top]
        return max(trials, key=lambda t: (sign * t.values[0], -t.number))
    if not settings.multi_objective:
        try:
            return study.best_trial
        except ValueError:
            raise PipelineError(f"study {study.study_name!r} has no complete trial to refit") from None
    trials = front(study)
    if not trials:
        raise PipelineError(f"study {study.study_name!r} has no complete trial to refit")
    objectives = settings.objective_names
    for name, limit in settings.select_rules.items():
        i = objectives.index(name)
        within = [t for t in trials if t.values[i] <= limit]
        if not within:
            smallest = min(trials, key=lambda t: t.values[i])
            raise PipelineError(f"select={settings.select!r}: no Pareto trial has {name} <= {limit:g} "
                                f"(the smallest is {smallest.values[i]:g}, trial {smallest.number})")
        trials = within
    return max(trials, key=lambda t: (sign * t.values[0], -t.number))


def verdict_of(study: optuna.Study, settings: Settings) -> Verdict | None:
    """The default-or-challenger verdict of a single-objective study with rungs (None: no default
    evaluated). The noise counts for accuracy-like metrics only, not for a loss."""
    if settings.multi_objective or not study_rungs(study)[0]:
        return None
    return control_verdict(study, settings.sign, shares=settings.metric != "val_loss")


def best_or_none(study: optuna.Study, settings: Settings) -> optuna.trial.FrozenTrial | None:
    """`best_trial`, or None while there is none (progress bars and summaries)."""
    try:
        return best_trial(study, settings)
    except PipelineError:
        return None

"""The space's default configuration as prior and control of a search with rungs.

    enqueue_default(study, space.default)      # the first evaluation: rung 0's, then every rung's
    sampler = PriorSampler(base, default, seed) # draws around the default, the incumbent, or as `base`
    verdict = control_verdict(study, sign)     # what the refit takes: the default unless beaten

A search that only fills a budget's short search share cannot beat a strong default by luck:
what works at small budgets (PriorBand, arXiv 2306.12370; piBO, 2204.11051) evaluates the
default first and searches close to it. Here:
- **control**: the default is enqueued before anything else (user attr `control`) and promoted
  first whenever a rung promotes (pipeline.budget.rungs), so each rung's first evaluation is the
  default, on the same rows and seed as its challengers;
- **prior**: `PriorSampler` draws each configuration in one of three ways, a third each (the
  way drawn from the trial's own seed): around the default (each numeric param from a normal
  around it, PRIOR_WIDTH of its range, in log space for log ranges; each categorical one kept
  with probability KEEP, else uniform), around the incumbent (the best evaluation of the rung the
  sampler learns from; PRIOR_WIDTH / 2), or as `base` proposes (TPE, random start-up first);
- **verdict**: the refit takes a challenger only where it beats the default at the highest rung
  where both have an evaluation, at equal time, by more than `noise`: one standard error of the difference of two
  accuracies on the validation rows, sqrt(2 p (1 - p) / n). Else the default;
- **give back**: `default_holds` says when the top rung has the default and `eta` challengers
  and none beats it: the search then ends and its time goes to the refit.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution

from pipeline import names
from pipeline.budget.rungs import COMPLETE, is_control, rung_of

PRIOR_WIDTH = 0.15  # standard deviation of a draw around the default, as a share of the param's range
KEEP = 0.6  # probability that a draw around a configuration keeps one of its categorical params
WAYS = ("prior", "incumbent", "base")


def enqueue_default(study: optuna.Study, default: dict | None) -> bool:
    """Enqueue the space's default as the study's first evaluation, once per study (resumes and
    other workers find it recorded); whether it was enqueued now."""
    if not default or study.user_attrs.get(names.DEFAULT_ENQUEUED) == default:
        return False
    study.enqueue_trial(default, user_attrs={names.CONTROL: True, names.WARM_START: "default"}, skip_if_exists=True)
    study.set_user_attr(names.DEFAULT_ENQUEUED, default)
    return True


def noise(value: float, rows: int) -> float:
    """One standard error of the difference of two accuracies near `value` on `rows` images
    (0 where the metric is not a share, or no rows are known)."""
    if not rows or not 0.0 <= value <= 1.0:
        return 0.0
    return math.sqrt(2 * value * (1 - value) / rows)


@dataclass(frozen=True)
class Verdict:
    """The refit's choice in a study with a control: `chosen` (the default's evaluation or a
    challenger's), the best challenger and the default at `rung`, and the noise it had to beat."""

    chosen: optuna.trial.FrozenTrial
    challenger: optuna.trial.FrozenTrial | None
    default: optuna.trial.FrozenTrial
    rung: int
    noise: float

    @property
    def margin(self) -> float:
        """How far the best challenger is ahead of the default (negative: behind)."""
        return self.challenger.values[0] - self.default.values[0] if self.challenger else 0.0

    def line(self, sign: int = 1) -> str:
        seconds = self.default.user_attrs.get(names.FIDELITY_SECONDS)
        at = f"rung {self.rung}" + (f" ({seconds:.0f} s)" if seconds else "")
        if self.chosen is self.default:
            if self.challenger is None:
                return f"refit takes the default: no challenger reached {at}"
            return (f"refit takes the default: the best challenger at {at}, trial {self.challenger.number}, is "
                    f"{sign * self.margin * 100:+.1f} points, within the noise ({self.noise * 100:.1f})")
        return (f"refit takes trial {self.chosen.number}: it beats the default at {at} by "
                f"{sign * self.margin * 100:.1f} points (noise {self.noise * 100:.1f})")


def control_verdict(study: optuna.Study, sign: int, shares: bool = True) -> Verdict | None:
    """The refit's choice between the default and its challengers at the highest rung where both
    have a complete evaluation (else the default's highest); None: the study has no complete
    evaluation of the default. `shares`: the metric is a share (an accuracy), whose noise the
    challenger must beat; else any lead counts."""
    done = study.get_trials(deepcopy=False, states=(COMPLETE,))
    defaults = [t for t in done if is_control(t)]
    if not defaults:
        return None
    both = {rung_of(t) for t in defaults} & {rung_of(t) for t in done if not is_control(t)}
    rung = max(both or {rung_of(t) for t in defaults})
    default = max((t for t in defaults if rung_of(t) == rung), key=lambda t: t.number)
    challengers = [t for t in done if rung_of(t) == rung and not is_control(t)]
    best = max(challengers, key=lambda t: (sign * t.values[0], -t.number), default=None)
    margin = noise(default.values[0], int(default.user_attrs.get(names.FIDELITY_VAL_ROWS, 0))) if shares else 0.0
    beats = best is not None and sign * (best.values[0] - default.values[0]) > margin
    return Verdict(best if beats else default, best, default, rung, margin)


def default_holds(study: optuna.Study, top: int, eta: int, sign: int) -> bool:
    """Whether the top rung has the default and at least `eta` challengers and none beats it:
    the evidence that searching on will not pay."""
    verdict = control_verdict(study, sign)
    if verdict is None or verdict.rung != top or verdict.chosen is not verdict.default:
        return False
    challengers = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
                   if rung_of(t) == top and not is_control(t)]
    return len(challengers) >= eta


class PriorSampler(optuna.samplers.BaseSampler):
    """`base` with a prior: each trial is drawn around the default, around the incumbent, or by
    `base`, a third each (see the module's docstring). Without a default, `base` alone."""

    def __init__(self, base: optuna.samplers.BaseSampler, default: dict | None, seed: int):
        self.base, self.default, self.seed = base, default or {}, seed
        self._independent = optuna.samplers.RandomSampler(seed=seed)

    def _way(self, study, trial) -> str:
        if not self.default:
            return "base"
        way = WAYS[np.random.default_rng([self.seed, trial.number]).integers(len(WAYS))]
        if way == "incumbent" and self._incumbent(study) is None:
            return "prior"
        return way

    @staticmethod
    def _incumbent(study) -> dict | None:
        direction = study.direction if len(study.directions) == 1 else None
        done = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if not is_control(t)]
        if not done or direction is None:
            return None
        sign = 1 if direction == optuna.study.StudyDirection.MAXIMIZE else -1
        return max(done, key=lambda t: sign * t.values[0]).params

    def infer_relative_search_space(self, study, trial):
        if self._way(study, trial) != "base":
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        way = self._way(study, trial)
        if way == "base":
            return self.base.sample_independent(study, trial, param_name, param_distribution)
        centre = self.default if way == "prior" else self._incumbent(study)
        if param_name not in centre or not param_distribution._contains(param_distribution.to_internal_repr(
                centre[param_name])):
            return self._independent.sample_independent(study, trial, param_name, param_distribution)
        width = PRIOR_WIDTH if way == "prior" else PRIOR_WIDTH / 2
        rng = np.random.default_rng([self.seed, trial.number, zlib.crc32(param_name.encode())])
        return around(centre[param_name], param_distribution, width, rng)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)


def around(value, distribution, width: float, rng: np.random.Generator):
    """A draw from `distribution` near `value`: a normal of `width` x the range (in log space for
    a log range), rounded to the step and clipped; a categorical value kept with probability KEEP."""
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        return value if rng.random() < KEEP else choices[rng.integers(len(choices))]
    low, high = distribution.low, distribution.high
    log = distribution.log
    to, back = (math.log, math.exp) if log else (float, float)
    x = to(value) + rng.normal() * width * (to(high) - to(low))
    x = min(max(back(x), low), high)
    step = getattr(distribution, "step", None)
    if step:
        x = low + round((x - low) / step) * step
    if isinstance(distribution, IntDistribution):
        return int(min(max(round(x), low), high))
    return float(min(max(x, low), high))

"""The plan of a `time_budget`: how long the search may run, how many epochs the refit trains,
the rungs of successive halving, all from what an epoch measurably costs on this machine.

    plan = make_plan(settings, command, started, cost)     # cost: pipeline.budget.probe
    print(plan.line())
    # time budget 3600 s: search until 10:52 UTC, refit 18 epochs ≈ 24 min, 62 s kept for the test and logging,
    # training in mixed_bfloat16

The budget counts from the process's start (loading included) and ends at `started + time_budget`:
- a reserve at the end for the test, the study report and logging: RESERVE_SECONDS + RESERVE_SHARE
  of the budget, plus the forward passes the end makes (the test split's images and the timed
  latency batches, each through every test-time view) at the probe's cost of one;
- `main`: the search gets a share of the time left after loading and the reserve, the refit the
  rest (or `refit_epochs` epochs where given); `search`: all of it; `refit`: all of it. The share
  (`search_share`, auto by default) follows from how many full runs of the probed configuration
  (the space's default: FULL_RUN_EPOCHS epochs over all training rows) the time pays for: near
  one, a search can find little that beats training the default longer, so it gets
  SHARE_AT_ONE_RUN; with n runs the time beyond one full run for the refit (1 - 1/n), at least
  SHARE_AT_ONE_RUN x sqrt(n), between MIN_SHARE and MAX_SHARE (`search_share_for`): epochs past a
  full run buy the refit little (the photos' default scored 0.8415 after 26 epochs and after 78,
  bench/README.md), a search can buy more. `search_share=0`: no search,
  the default trains for the whole budget;
- the rungs, where `rungs` is empty: equal-time rungs (`planned_rung_seconds`), each evaluation
  given a number of *seconds*, its epochs following from its own measured epoch cost, so that a
  configuration half as costly trains twice the epochs and the rungs rank what configurations
  reach in equal time: the most rungs (at most MAX_RUNGS, a factor `eta` apart) whose lowest pays
  for one epoch of the probed configuration when the search's share pays for BRACKETS full
  brackets (a bracket costs about rungs x top-rung seconds, and the default's evaluation at each
  rung above the lowest: the control); the top rung no longer than the refit. Too short a search
  for two: one equal-time rung, MIN_TRIALS evaluations (the default, the control, and its
  challengers) of equal seconds, so that the refit still takes a challenger only where it beats
  the default at equal time (pipeline.budget.prior). The plan line gives the probed
  configuration's epochs at each;
- without rungs (too short a search for one epoch of MIN_TRIALS evaluations, or `rungs=off`): a
  trial's epochs are capped so that MIN_TRIALS trials fit the search's share (`epochs` caps it
  further).
A `timeout` still sets the search's end; `epochs` still caps a trial without rungs. The refit's
epochs are planned again when it starts, from a probe of the configuration it refits and the
time then left (`refit_epochs`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from pipeline.config import Settings

RESERVE_SECONDS = 10.0  # the end of a run: the study report, saving, logging and registering the models
RESERVE_SHARE = 0.01  # and this share of the budget (the test's forward passes are counted apart)
FULL_RUN_EPOCHS = 40  # a full training run: airbench96 trains 37-45 epochs; the CPU hour's refit of
# airbench94 (42 epochs) ended at train accuracy 0.996 (bench/README.md)
SHARE_AT_ONE_RUN = 0.15  # the search's share where the time pays for one full run of the default
MIN_SHARE, MAX_SHARE = 0.1, 0.75
BRACKETS = 1  # full brackets of successive halving the search's share should pay for
MIN_TRIALS = 3  # evaluations of one equal-time rung, or plain trials without rungs, the search's share should pay for
MAX_RUNGS = 3
BOOKKEEPING = 2.0  # seconds around an evaluation's fit (its MLflow run, datasets, the study's writes)
HISTORY = 20  # finished evaluations an estimate learns from, the latest
VALIDATION_COST = 1 / 3  # an image validated costs about this share of one trained (a forward pass)


@dataclass(frozen=True)
class Cost:
    """What training costs on this machine: `setup` seconds once per fit (building, compiling, the
    first batches' tracing) and `batch` seconds per training batch of `batch_size` images."""

    setup: float
    batch: float
    batch_size: int

    def epoch(self, rows: int) -> float:
        """Seconds of one epoch over `rows` training images."""
        return math.ceil(rows / self.batch_size) * self.batch

    def fit(self, epochs: int, rows: int, val_rows: int = 0) -> float:
        """Seconds of a fit of `epochs` epochs over `rows` images, validating `val_rows` after each."""
        return self.setup + epochs * (self.epoch(rows) + VALIDATION_COST * self.epoch(val_rows))


def budget_end(settings: Settings, started: float) -> float | None:
    """Epoch seconds at which the command's budget ends (None without one)."""
    return started + settings.time_budget if settings.time_budget else None


def reserve(settings: Settings, cost: Cost | None = None, forward_images: int = 0) -> float:
    """Seconds kept at the budget's end: RESERVE_SECONDS + RESERVE_SHARE of the budget, plus
    `forward_images` forward passes of one image (the test's, pipeline.refit.forward_images) at
    `cost`'s rate (VALIDATION_COST of an image trained)."""
    fixed = RESERVE_SECONDS + RESERVE_SHARE * settings.time_budget
    return fixed + (forward_images * VALIDATION_COST * cost.batch / cost.batch_size if cost else 0.0)


def refit_epochs_for(seconds: float, cost: Cost, rows: int) -> int:
    """The most epochs over `rows` images that fit `seconds` (at least 1: a refit trains)."""
    return max(1, int((seconds - cost.setup) // cost.epoch(rows)))


def search_share_for(runs: float) -> float:
    """The search's share of a budget that pays for `runs` full runs of the default: the time
    beyond one full run, 1 - 1/runs, at least SHARE_AT_ONE_RUN x sqrt(runs), between MIN_SHARE and
    MAX_SHARE."""
    runs = max(0.0, runs)
    beyond = 1 - 1 / runs if runs > 1 else 0.0
    return min(MAX_SHARE, max(MIN_SHARE, SHARE_AT_ONE_RUN * math.sqrt(runs), beyond))


def planned_rung_seconds(search_seconds: float, cost: Cost, rows: int, val_rows: int, eta: int,
                         cap: float = math.inf) -> list[float]:
    """Seconds per rung for a search of `search_seconds`: the top rung the most seconds for which
    BRACKETS brackets of `count` rungs fit (a bracket costs about `count` top-rung evaluations, the
    default's own at every rung above the lowest (the control, promoted beside the challengers: 1,
    1/eta, ... top-rung evaluations) and eta^(count - 1) evaluations' bookkeeping; one rung,
    MIN_TRIALS evaluations), at most `cap` (the refit's time), the rungs below it a factor eta
    apart; MAX_RUNGS rungs where the lowest pays for one epoch of `cost`'s configuration, else
    fewer; [] where not even one does."""
    one_epoch = cost.fit(1, rows, val_rows)
    for count in range(MAX_RUNGS, 0, -1):
        evaluations = count + sum(eta ** -i for i in range(count - 1)) if count > 1 else MIN_TRIALS
        top = min(cap, search_seconds / BRACKETS / evaluations - BOOKKEEPING * eta ** (count - 1))
        seconds = [round(top / eta ** i, 1) for i in reversed(range(count))]
        if seconds[0] >= one_epoch:
            return seconds
    return []


def epochs_in(seconds: float, setup: float, epoch: float) -> int:
    """The epochs an evaluation of `seconds` trains at `setup` seconds a fit and `epoch` seconds an
    epoch (its validation included): at least 1."""
    return max(1, int((seconds - setup) // max(epoch, 1e-6)))


# Params that change what a configuration learns, not what an epoch of it costs (a configuration's
# cost is known by the others: `cost_key`)
COST_FREE = ("learning_rate", "warmup", "weight_decay", "label_smoothing", "momentum", "schedule", "optimizer",
             "bn_momentum", "bn_bias_lr", "head_scale", "dropout", "max_norm", "tta")


def cost_key(params: dict) -> str:
    """What a configuration's epoch cost is known by: its params less the COST_FREE ones (and
    those ending in them: `conv2_dropout`, `dense_max_norm`), as one sorted string."""
    kept = sorted((k, v) for k, v in params.items() if not k.endswith(COST_FREE))
    return ",".join(f"{k}={v}" for k, v in kept)


def duration(seconds: float) -> str:
    """`24 min` from two minutes on, else `45 s`."""
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


@dataclass(frozen=True)
class Plan:
    budget: int
    end: float  # epoch seconds: the budget's end
    search_until: float | None  # epoch seconds: no evaluation starts that cannot finish by then
    refit_epochs: int  # 0: no refit in this command
    refit_seconds: float
    rungs: tuple[int, ...]  # planned epochs per rung ((): none planned); with rung_seconds, the probed configuration's
    trial_epochs: int = 0  # without rungs: the most epochs a trial may train (0: `epochs`, unplanned)
    reserve: float = 0.0  # seconds kept at the end (`reserve`)
    rung_seconds: tuple[float, ...] = ()  # equal-time rungs: seconds per rung
    share: float | None = None  # `main`: the search's share of the time after loading and the reserve
    runs: float | None = None  # `main`: the full runs of the probed configuration that time pays for
    precision: str = ""  # the Keras dtype policy that trains, and so that the probe timed (pipeline.device)

    def line(self) -> str:
        parts = []
        if self.share is not None:
            why = (f"the budget pays for {self.runs:.1f} full runs of {FULL_RUN_EPOCHS} epochs of the default"
                   if self.runs is not None else "search_share")
            parts.append(f"search {self.share:.0%} of the time ({why})" if self.share else
                         "no search (search_share=0): the default (or the first warm start) trains for the whole budget")
        if self.search_until is not None and self.share != 0:
            parts.append(f"search until {time.strftime('%H:%M:%S UTC', time.gmtime(self.search_until))}")
        if self.rung_seconds:
            what = "rung" if len(self.rung_seconds) == 1 else "rungs"
            parts.append(f"equal-time {what} of {', '.join(f'{s:.0f}' for s in self.rung_seconds)} s "
                         f"({', '.join(map(str, self.rungs))} epoch{'' if self.rungs == (1,) else 's'} of the default)")
        elif self.rungs:
            parts.append(f"rungs of {', '.join(map(str, self.rungs))} epochs")
        elif self.trial_epochs:
            parts.append(f"trials of at most {self.trial_epochs} epoch(s)")
        if self.refit_epochs:
            parts.append(f"refit {self.refit_epochs} epochs ≈ {duration(self.refit_seconds)}")
        if self.reserve:
            parts.append(f"{duration(self.reserve)} kept for the test and logging")
        if self.precision:
            parts.append(f"training in {self.precision}")
        return f"time budget {self.budget} s: " + ", ".join(parts)

    def metrics(self, now: float) -> dict:
        """The plan as numbers for the parent run (beside the tag `plan`, the line); the epoch
        seconds `plan_budget_end` less `plan_budget_seconds` is when the budget started (the
        process's start: a time line of the run, pipeline.report.timeline_png, begins there)."""
        shares = {} if self.share is None else {"plan_search_share": self.share}
        return {"plan_budget_seconds": self.budget, "plan_budget_end": self.end, "plan_refit_epochs": self.refit_epochs,
                "plan_search_seconds": max(0.0, (self.search_until or now) - now),
                "plan_search_until": self.search_until or 0.0, **shares}


def make_plan(settings: Settings, command: str, started: float, cost: Cost | None, *, rows: int, val_rows: int,
              forward_images: int = 0, now: float | None = None, precision: str = "") -> Plan:
    """The plan of `command` (main, search, refit) for a budget that started at `started`; `rows`
    and `val_rows`: the images a trial trains and validates on (the refit trains on both);
    `forward_images`: the forward passes of the refit's test (`reserve`); `precision`: the dtype
    policy that trains (and that the probe timed), named in the plan line. `cost` (the probe) is
    needed for a refit and for planned rungs; a `search` worker joining a study whose rungs are
    fixed goes without."""
    now = time.time() if now is None else now
    end = budget_end(settings, started)
    kept = reserve(settings, cost, forward_images if command in ("main", "refit") else 0)
    left = end - now - kept
    full = rows + val_rows
    refit_epochs, refit_seconds, share, runs = 0, 0.0, None, None
    if command == "main":
        share = settings.share
        if share is None:
            runs = left / cost.fit(FULL_RUN_EPOCHS, full)
            share = search_share_for(runs)
        if settings.refit_epochs:
            refit_epochs = settings.refit_epochs
        else:
            refit_epochs = refit_epochs_for((1 - share) * left, cost, full)
        refit_seconds = cost.fit(refit_epochs, full)
    elif command == "refit":
        refit_epochs = settings.refit_epochs or refit_epochs_for(left, cost, full)
        refit_seconds = cost.fit(refit_epochs, full)
    search_until = None
    rungs: list[int] = []
    seconds: list[float] = []
    if command in ("main", "search"):
        search_until = now + max(0.0, left - refit_seconds)
        if settings.rung_epochs is None and cost is not None and share != 0:
            seconds = planned_rung_seconds(search_until - now, cost, rows, val_rows, settings.eta,
                                           cap=math.inf if settings.refit_epochs or not refit_seconds else refit_seconds)
            per_epoch = cost.epoch(rows) + VALIDATION_COST * cost.epoch(val_rows)
            rungs = [epochs_in(s, cost.setup + BOOKKEEPING, per_epoch) for s in seconds]
    if share == 0:
        search_until = now
    trial_epochs = 0
    if search_until is not None and cost is not None and not rungs and settings.rung_epochs in (None, []) and share != 0:
        trial_epochs = min(settings.epochs, trial_epochs_for(search_until - now, cost, rows, val_rows))
    return Plan(settings.time_budget, end, search_until, refit_epochs, refit_seconds, tuple(rungs), trial_epochs, kept,
                tuple(seconds), share, runs, precision)


def trial_epochs_for(search_seconds: float, cost: Cost, rows: int, val_rows: int) -> int:
    """Without rungs: the most epochs for which MIN_TRIALS trials fit the search's share (at least 1)."""
    per_trial = search_seconds / MIN_TRIALS - cost.setup - BOOKKEEPING
    return max(1, int(per_trial // (cost.epoch(rows) + VALIDATION_COST * cost.epoch(val_rows))))


def evaluation_seconds(epochs: int, history: list[tuple[int, float]], cost: Cost | None, rows: int,
                       val_rows: int) -> float | None:
    """Seconds an evaluation of `epochs` epochs will take: a + b x epochs fitted to `history`
    ((epochs run, seconds) of finished evaluations, latest last) where it has two epoch counts;
    from one count, the probe's fixed cost plus the measured seconds per epoch; from none, the
    probe's `cost`. None: nothing to go by (the evaluation starts; it measures)."""
    history = history[-HISTORY:]
    if len({e for e, _ in history}) >= 2:
        b, a = np.polyfit([e for e, _ in history], [d for _, d in history], 1)
        if b > 0:
            return max(0.0, a) + b * epochs
    if history:
        fixed = (cost.setup if cost else 0.0) + BOOKKEEPING
        per_epoch = max(max(0.0, d - fixed) / e for e, d in history if e)
        return fixed + per_epoch * epochs
    if cost is not None:
        return cost.fit(epochs, rows, val_rows) + BOOKKEEPING
    return None

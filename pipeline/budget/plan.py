"""The plan of a `time_budget`: how long the search may run, how many epochs the refit trains,
the rungs of successive halving, all from what an epoch measurably costs on this machine.

    plan = make_plan(settings, command, started, cost)     # cost: pipeline.budget.probe
    print(plan.line())
    # time budget 3600 s: search until 10:52 UTC, refit 18 epochs ≈ 24 min, 62 s kept for the test and logging

The budget counts from the process's start (loading included) and ends at `started + time_budget`:
- a reserve at the end for the test, the study report and logging: RESERVE_SECONDS + RESERVE_SHARE
  of the budget, plus the forward passes the end makes (the test split's images and the timed
  latency batches, each through every test-time view) at the probe's cost of one;
- `main`: the refit gets REFIT_SHARE of the time left after loading and the reserve (or
  `refit_epochs` epochs where given), the search the rest; `search`: all of it; `refit`: all of it;
- without rungs (too short a search for two, or `rungs=off`): a trial's epochs are capped so that
  MIN_TRIALS trials fit the search's share (`epochs` caps it further);
- the rungs, where `rungs` is empty: the most rungs (at most MAX_RUNGS, a factor `eta` apart) whose
  top rung is at least 1 epoch when the search's share pays for BRACKETS full brackets of
  successive halving (a bracket costs about rungs x top-rung epochs).
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
REFIT_SHARE = 0.5  # of the time after loading and the reserve, for `main`'s refit
BRACKETS = 1  # full brackets of successive halving the search's share should pay for
MIN_TRIALS = 3  # without rungs: plain trials the search's share should pay for
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


def planned_rungs(search_seconds: float, cost: Cost, rows: int, val_rows: int, eta: int) -> list[int]:
    """Epochs per rung for a search of `search_seconds`: the top rung is the most epochs for which
    BRACKETS brackets of `count` rungs fit (a bracket costs about `count` top-rung evaluations and
    eta^(count - 1) evaluations' bookkeeping), the rungs below it a factor eta apart, none below 1
    epoch; MAX_RUNGS rungs where the top reaches eta epochs, else fewer; [] where not two fit."""
    for count in range(MAX_RUNGS, 1, -1):
        per_rung = search_seconds / BRACKETS / count - cost.setup - BOOKKEEPING * eta ** (count - 1)
        top = int(per_rung // (cost.epoch(rows) + VALIDATION_COST * cost.epoch(val_rows)))
        rungs = sorted({max(1, round(top / eta ** i)) for i in range(count)})
        if top >= eta ** (count - 2) and len(rungs) >= 2:
            return rungs
    return []  # not even two rungs: plain trials


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
    rungs: tuple[int, ...]  # planned epochs per rung ((): none planned)
    trial_epochs: int = 0  # without rungs: the most epochs a trial may train (0: `epochs`, unplanned)
    reserve: float = 0.0  # seconds kept at the end (`reserve`)

    def line(self) -> str:
        parts = []
        if self.search_until is not None:
            parts.append(f"search until {time.strftime('%H:%M:%S UTC', time.gmtime(self.search_until))}")
        if self.rungs:
            parts.append(f"rungs of {', '.join(map(str, self.rungs))} epochs")
        elif self.trial_epochs:
            parts.append(f"trials of at most {self.trial_epochs} epoch(s)")
        if self.refit_epochs:
            parts.append(f"refit {self.refit_epochs} epochs ≈ {duration(self.refit_seconds)}")
        if self.reserve:
            parts.append(f"{duration(self.reserve)} kept for the test and logging")
        return f"time budget {self.budget} s: " + ", ".join(parts)

    def metrics(self, now: float) -> dict:
        """The plan as numbers for the parent run (beside the tag `plan`, the line)."""
        return {"plan_budget_seconds": self.budget, "plan_refit_epochs": self.refit_epochs,
                "plan_search_seconds": max(0.0, (self.search_until or now) - now),
                "plan_search_until": self.search_until or 0.0}


def make_plan(settings: Settings, command: str, started: float, cost: Cost | None, *, rows: int, val_rows: int,
              forward_images: int = 0, now: float | None = None) -> Plan:
    """The plan of `command` (main, search, refit) for a budget that started at `started`; `rows`
    and `val_rows`: the images a trial trains and validates on (the refit trains on both);
    `forward_images`: the forward passes of the refit's test (`reserve`). `cost` (the probe) is
    needed for a refit and for planned rungs; a `search` worker joining a study whose rungs are
    fixed goes without."""
    now = time.time() if now is None else now
    end = budget_end(settings, started)
    kept = reserve(settings, cost, forward_images if command in ("main", "refit") else 0)
    left = end - now - kept
    full = rows + val_rows
    refit_epochs, refit_seconds = 0, 0.0
    if command == "main":
        if settings.refit_epochs:
            refit_epochs = settings.refit_epochs
        else:
            refit_epochs = refit_epochs_for(REFIT_SHARE * left, cost, full)
        refit_seconds = cost.fit(refit_epochs, full)
    elif command == "refit":
        refit_epochs = settings.refit_epochs or refit_epochs_for(left, cost, full)
        refit_seconds = cost.fit(refit_epochs, full)
    search_until = None
    rungs: list[int] = []
    if command in ("main", "search"):
        search_until = now + max(0.0, left - refit_seconds)
        if settings.rung_epochs is None and cost is not None:
            rungs = planned_rungs(search_until - now, cost, rows, val_rows, settings.eta)
    trial_epochs = 0
    if search_until is not None and cost is not None and not rungs and settings.rung_epochs in (None, []):
        trial_epochs = min(settings.epochs, trial_epochs_for(search_until - now, cost, rows, val_rows))
    return Plan(settings.time_budget, end, search_until, refit_epochs, refit_seconds, tuple(rungs), trial_epochs, kept)


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

"""The core sequence of a study, in one function that the CLI, the tests and the bench
scripts call:

    outcome = run_study("main", settings, data, space)   # search -> front -> report -> refit -> summary

join (or create) the study, enqueue warm-start configurations, find or make its MLflow
parent run, search (`main`, `search`), log the Pareto front (multi-objective studies),
the study report (plots, trials table), refit and test (`main`, `refit`), print the
summary (with the wall seconds of this process's search, `search_seconds`, and the refit's
phases) and rewrite the parent run's description; then end this process's runs: FINISHED,
FAILED on an error, KILLED on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna

from pipeline.config import REFITS, SEARCHES, Settings
from pipeline.data import Dataset
from pipeline.pareto import log_front
from pipeline.refit import refit_and_test
from pipeline.report import log_study_report
from pipeline.search import Objective, run_search
from pipeline.space import SearchSpace
from pipeline.study import join_study
from pipeline.terminal import description, summary
from pipeline.tracking import Tracker
from pipeline.warm_start import enqueue


@dataclass(frozen=True)
class Outcome:
    study: optuna.Study
    parent_run_id: str
    metrics: dict  # the test metrics of a refit, else {}


def run_study(command: str, settings: Settings, data: Dataset, space: SearchSpace, *, warm: dict | None = None,
              device: str = "", callbacks=()) -> Outcome:
    """Run `command` (main, search or refit) on the study `settings` names.

    `warm`: validated warm-start configurations {name: params} to enqueue first.
    `device`: the description of the device that trains, tagged on the runs.
    `callbacks`: extra Keras callbacks for every trial's fit (the bench's epoch clock).
    """
    study, created = join_study(settings, space, create=command != "refit")
    if command in SEARCHES and settings.multi_objective and settings.pruner != "none":
        print(f"pruning is off: Optuna does not prune multi-objective studies (pruner={settings.pruner} ignored)")
    if warm:
        new = enqueue(study, warm)
        print(f"warm start: enqueued {', '.join(new)}" if new else "warm start: configurations already enqueued")
    # a worker that lost the race to create the study waits for the winner's parent run
    tracker = Tracker(settings, study, wait_for_parent=not created and command != "refit", device=device)
    status = "FAILED"
    try:
        timings = {}
        if command in SEARCHES:
            start = time.perf_counter()
            run_search(study, Objective(data, space, settings, tracker, callbacks), settings)
            timings["search_seconds"] = time.perf_counter() - start  # this process's search
        if command in SEARCHES and settings.multi_objective:
            log_front(study, settings, tracker)
        log_study_report(study, tracker.client, tracker.parent_run_id)
        metrics = {**timings, **refit_and_test(study, data, settings, tracker)} if command in REFITS else {}
        tracker.describe(description(study, settings, tracker.client.get_run(tracker.parent_run_id)))
        print(summary(study, settings, tracker.parent_run_id, metrics))
        status = "FINISHED"
        return Outcome(study, tracker.parent_run_id, metrics)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)

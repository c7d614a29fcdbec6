"""The core sequence of a study, in one function that the CLI, the tests and the bench
scripts call:

    outcome = run_study("main", settings, data, space)   # search -> front -> report -> refit -> summary

join (or create) the study, enqueue warm-start configurations, find or make its MLflow
parent run, fix the study's rungs (successive halving, pipeline.budget.rungs) and, under a
`time_budget`, plan the run from a timed probe (pipeline.budget.plan: the plan's line is printed
and tagged `plan` on the parent), search (`main`, `search`: in this process, in `workers`
processes, or as `workers` tasks on the Dask `cluster`: pipeline.cluster), log the Pareto front
(multi-objective studies), the study report (plots, trials table), refit and test (`main`,
`refit`; under a budget the refit's epochs are planned again from a probe of the configuration
it refits and the time left), print the summary (with the wall seconds of this process's
search, `search_seconds`, and the refit's phases) and rewrite the parent run's description;
then end this process's runs: FINISHED, FAILED on an error, KILLED on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna
import psutil

from pipeline import names
from pipeline.budget.plan import Cost, Plan, duration, make_plan, refit_epochs_for, reserve
from pipeline.budget.prior import enqueue_default
from pipeline.budget.rungs import check_rungs, fix_rungs, rung_seconds
from pipeline.config import REFITS, SEARCHES, Settings
from pipeline.data import Dataset
from pipeline.device import dtype_policy
from pipeline.errors import PipelineError
from pipeline.pareto import log_front
from pipeline.recover import settle
from pipeline.refit import forward_images, refit_and_test
from pipeline.report import log_study_report
from pipeline.search import Objective, run_search
from pipeline.space import SearchSpace
from pipeline.study import TPE_STARTUP, join_study, set_startup
from pipeline.terminal import description, summary
from pipeline.tracking import Tracker, log_metrics
from pipeline.warm_start import enqueue


@dataclass(frozen=True)
class Outcome:
    study: optuna.Study
    parent_run_id: str
    metrics: dict  # the test metrics of a refit, else {}


def process_start() -> float:
    """Epoch seconds at which this process started: a time budget counts from there."""
    return psutil.Process().create_time()


def _probe(params: dict, data: Dataset, rows, seed: int) -> Cost:
    from pipeline.budget.probe import probe

    return probe(params, data.x_train, data.y_train, rows, data.input_shape, data.n_classes, seed=seed)


PROBES = 3  # configurations a plan without a warm start probes


def _planning_probe(command: str, study, space: SearchSpace, warm: dict | None, data: Dataset, rows,
                    settings: Settings) -> tuple[dict, Cost]:
    """(params, cost) the plan goes by before any evaluation: `refit` probes the configuration it
    refits, a search the first warm start, else the space's default, else PROBES configurations
    sampled from the space and takes the one of median cost, so that a space whose configurations
    differ tenfold in cost (modern.yaml) is not planned from its cheapest or its dearest."""
    if command == "refit":
        choices = [_best_params(study, settings)]
    elif warm:
        choices = [next(iter(warm.values()))]
    elif space.default:
        choices = [space.default]
    else:
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
        try:
            sampled = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings.seed))
            choices = [space.sample(sampled.ask()) for _ in range(PROBES)]
        finally:
            optuna.logging.set_verbosity(verbosity)
    probed = sorted(((_probe(params, data, rows, settings.seed), params) for params in choices),
                    key=lambda cp: cp[0].epoch(len(rows)))
    cost, params = probed[len(probed) // 2]
    return params, cost


def _startup(plan: Plan, rungs: list[int], cost: Cost, rows: tuple[int, int], workers: int, epochs: int) -> int:
    """TPE's random start-up evaluations: a third of the rung-0 (or plain) evaluations the search's
    share pays for (with rungs about 1/len(rungs) of its time goes to rung 0), 2 to 10."""
    seconds = (plan.search_until - time.time()) * workers / max(1, len(rungs))
    evaluations = seconds / max(1e-3, cost.fit(rungs[0] if rungs else epochs, *rows))
    return int(min(2 * TPE_STARTUP, max(2, evaluations // 3)))


def run_study(command: str, settings: Settings, data: Dataset, space: SearchSpace, *, warm: dict | None = None,
              device: str = "", callbacks=(), started: float | None = None) -> Outcome:
    """Run `command` (main, search or refit) on the study `settings` names.

    `warm`: validated warm-start configurations {name: params} to enqueue first.
    `device`: the description of the device that trains, tagged on the runs.
    `callbacks`: extra Keras callbacks for every trial's fit (the bench's epoch clock).
    `started`: epoch seconds at which the `time_budget` started (default: this process's start).
    """
    study, created = join_study(settings, space, create=command != "refit")
    if command in SEARCHES and settings.multi_objective and settings.pruner != "none":
        print(f"pruning is off: Optuna does not prune multi-objective studies (pruner={settings.pruner} ignored)")
    if settings.multi_objective and settings.rung_epochs:
        raise PipelineError(f"rungs={settings.rungs!r}: successive halving ranks by one metric; "
                            f"objectives={settings.objectives!r} has several")
    if command in SEARCHES:
        check_rungs(study, settings.rung_epochs)
    fixed = _fixed_configuration(command, settings, space, warm)  # search_share=0: what trains, unsearched
    if (command in SEARCHES and fixed is None and (settings.time_budget or settings.rung_epochs)
            and study.user_attrs.get(names.RUNGS) != [] and enqueue_default(study, space.default)):
        print("the space's default is the first evaluation (the control); see pipeline/budget/prior.py")
    if warm and fixed is None:
        new = enqueue(study, warm)
        print(f"warm start: enqueued {', '.join(new)}" if new else "warm start: configurations already enqueued")
    # a worker that lost the race to create the study waits for the winner's parent run
    tracker = Tracker(settings, study, wait_for_parent=not created and command != "refit", device=device)
    status = "FAILED"
    try:
        objective = Objective(data, space, settings, tracker, callbacks) if command in SEARCHES else None
        rows = objective.rows if objective else (len(data.y_train), 0)
        plan = cost = None
        forwards = 0  # images the test passes forward (a budget keeps room for them)
        if settings.time_budget:
            started = process_start() if started is None else started
            if command in REFITS or (command == "search" and settings.rung_epochs is None
                                     and names.RUNGS not in study.user_attrs):
                train_rows = objective.splits[0].train_rows if objective else range(len(data.y_train))
                params, cost = _planning_probe(command, study, space, {"fixed": fixed} if fixed else warm, data,
                                               train_rows, settings)
                forwards = forward_images(params, len(data.test))
            plan = make_plan(settings, command, started, cost, rows=rows[0], val_rows=rows[1], forward_images=forwards,
                             precision=dtype_policy())
            print(plan.line(), flush=True)
            tracker.client.set_tag(tracker.parent_run_id, "plan", plan.line())
            log_metrics(tracker.client, tracker.parent_run_id, plan.metrics(time.time()))
        timings = {}
        if command in SEARCHES and fixed is None:
            planned = list(plan.rungs) if plan and not settings.multi_objective else []
            seconds = list(plan.rung_seconds) if plan and not settings.multi_objective else []
            objective.rungs = fix_rungs(study, settings.rung_epochs, planned, settings.eta, seconds)
            objective.seconds = rung_seconds(study) if objective.rungs else []
            if plan and cost:  # stored in the study, so that the workers it starts sample alike
                study.set_user_attr(names.TPE_STARTUP, _startup(plan, objective.rungs, cost, rows, settings.workers,
                                                                settings.epochs))
            if plan and plan.trial_epochs and not objective.rungs:  # plain trials the search's share can pay for
                objective.settings = settings.replace(epochs=plan.trial_epochs)
            if names.TPE_STARTUP in study.user_attrs:
                set_startup(study, int(study.user_attrs[names.TPE_STARTUP]))
            until = plan.search_until if plan else None
            start = time.perf_counter()
            if settings.cluster:  # the workers as tasks on a Dask cluster
                from pipeline.cluster.submit import run_tasks

                run_tasks(study, objective.settings, until)
                settle(study, tracker.client, tracker.experiment_id, settings)  # a task lost for good leaves none RUNNING
            elif settings.workers > 1:
                from pipeline.budget.workers import run_workers

                run_workers(study, objective.settings, until)  # with the plan's cap on a trial's epochs
            else:
                run_search(study, objective, settings, until=until, cost=cost)
            timings["search_seconds"] = time.perf_counter() - start  # this process's search
        if command in SEARCHES and settings.multi_objective:
            log_front(study, settings, tracker)
        log_study_report(study, tracker.client, tracker.parent_run_id)
        metrics = {}
        if command == "refit":  # a worker killed late leaves no RUNNING trial behind (`main` settled in its search)
            settle(study, tracker.client, tracker.experiment_id, settings)
        if command in REFITS:
            params = fixed or _best_params(study, settings)
            epochs, stop_at = _refit_plan(params, settings, data, plan, cost, command) if plan else (None, None)
            metrics = {**timings, **refit_and_test(study, data, settings, tracker, epochs=epochs, stop_at=stop_at,
                                                   params=fixed)}
        tracker.describe(description(study, settings, tracker.client.get_run(tracker.parent_run_id)))
        print(summary(study, settings, tracker.parent_run_id, metrics))
        status = "FINISHED"
        return Outcome(study, tracker.parent_run_id, metrics)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _best_params(study: optuna.Study, settings: Settings) -> dict:
    from pipeline.best import best_trial

    return best_trial(study, settings).user_attrs[names.PARAMS]


def _fixed_configuration(command: str, settings: Settings, space: SearchSpace, warm: dict | None) -> dict | None:
    """`main` with `search_share=0`: the configuration trained for the whole budget, no search: the
    first warm start, else the space's default (a one-line error where it has neither)."""
    if command != "main" or settings.share != 0:
        return None
    if warm:
        return next(iter(warm.values()))
    if space.default is None:
        raise PipelineError(f"search_share=0: {space.path} declares no default and no warm_start is given: "
                            "nothing to train without a search")
    return space.default


def _refit_plan(params: dict, settings: Settings, data: Dataset, plan: Plan, cost: Cost | None,
               command: str) -> tuple[int, float]:
    """The refit's epochs and the epoch seconds its fit must end by, planned again now: from a probe
    of the configuration it refits (`cost` where `refit` just made one; `main`'s first probe
    where `refit_epochs` is given), the most epochs that fit the time left before the budget's
    reserve, itself sized for that configuration's test (`refit_epochs` where given)."""
    rows = len(data.y_train)
    if command == "main" and not settings.refit_epochs and settings.share != 0:
        cost = _probe(params, data, range(rows), settings.seed)
    kept = reserve(settings, cost, forward_images(params, len(data.test)))
    if settings.refit_epochs:
        return settings.refit_epochs, plan.end - kept
    left = plan.end - time.time() - kept
    epochs = refit_epochs_for(left, cost, rows)
    print(f"refit plan: {epochs} epoch(s) ≈ {duration(cost.fit(epochs, rows))} of the {duration(max(0.0, left))} left "
          f"before the budget's reserve of {duration(kept)} ({cost.epoch(rows):.1f} s an epoch here)", flush=True)
    return epochs, plan.end - kept

"""A search inside a wall-clock budget: the planner, a time-budgeted `main` that stops starting
evaluations once its search share is spent, successive halving (rungs, promotions) with two
worker processes on one journal storage, a killed worker's rung evaluation retried, the rung
tags and trials.csv columns, and a study made before rungs that still resumes.

Real training on digits throughout; no timing is asserted, only what the plan decided and
what the study and MLflow recorded.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time

import optuna
import pytest
from conftest import runs_of

from pipeline import names
from pipeline.budget.plan import (FULL_RUN_EPOCHS, Cost, epochs_in, evaluation_seconds, make_plan, planned_rung_seconds,
                                  refit_epochs_for, search_share_for)
from pipeline.budget.rungs import due_promotions
from pipeline.cli import run
from pipeline.config import Settings
from pipeline.core import run_study
from pipeline.errors import PipelineError
from pipeline.refit import forward_images
from pipeline.search import Objective, run_search
from pipeline.space import load_space
from pipeline.study import join_study
from pipeline.tracking import Tracker, store_client

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
TINY_SPACE = """\
depth: 1
first_block: {filters: [4, 8, 16], kernel_size: [2, 3], pool_size: 2}
dense: {units: {low: 8, high: 512}}
"""


@pytest.fixture
def tiny(settings, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return settings.replace(search_space=str(path))


def journal(path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_the_planner_sizes_the_refit_and_the_search_from_the_epoch_cost():
    cost = Cost(setup=5.0, batch=0.5, batch_size=100)  # 50 s an epoch of 10,000 images
    assert cost.epoch(10_000) == 50.0 and cost.epoch(10_001) == 50.5
    assert refit_epochs_for(1000.0, cost, 10_000) == 19  # (1000 - 5) // 50
    assert refit_epochs_for(10.0, cost, 10_000) == 1  # a refit always trains

    s = Settings(time_budget=3600)
    plan = make_plan(s, "main", started=1000.0, cost=cost, rows=8000, val_rows=2000, now=1000.0)
    left = 3600 - (10 + 36)  # the reserve: 10 s + 1% of the budget
    runs = left / cost.fit(FULL_RUN_EPOCHS, 10_000)  # 1.77 full runs of the probed configuration
    share = search_share_for(runs)
    # the search gets the time beyond one full run for the refit: 1 - 1/1.77 = 44%
    assert plan.runs == pytest.approx(runs) and plan.share == pytest.approx(1 - 1 / runs)
    assert plan.refit_epochs == int(((1 - share) * left - 5) // 50) == 39
    assert plan.search_until == pytest.approx(1000 + left - (5 + 39 * 50))
    # equal-time rungs: three would start below one epoch (48.3 s) once a bracket pays for the default's
    # own evaluations above rung 0 too, so two, 3x apart: 3 rung-0 evaluations, a challenger and the default at rung 1
    assert plan.rung_seconds == (175.7, 527.0) and plan.rungs == (3, 11)  # the probed configuration's epochs
    assert plan.line().startswith("time budget 3600 s: search 44% of the time (the budget pays for 1.8 full runs")
    assert "equal-time rungs of 176, 527 s (3, 11 epochs of the default)" in plan.line()
    assert "refit 39 epochs ≈ 33 min" in plan.line()
    # twice the cost per epoch (a slower machine, or one thread): fewer runs, a smaller share
    slow = make_plan(s, "main", 1000.0, Cost(5.0, 1.0, 100), rows=8000, val_rows=2000, now=1000.0)
    assert slow.share < plan.share and slow.refit_epochs == int(((1 - slow.share) * left - 5) // 100)
    # search_share given: the planner's share is not used; 0: no search, the refit takes the time
    half = make_plan(s.replace(search_share="0.5"), "main", 1000.0, cost, rows=8000, val_rows=2000, now=1000.0)
    assert half.share == 0.5 and half.runs is None and half.refit_epochs == int((0.5 * left - 5) // 50) == 35
    none = make_plan(s.replace(search_share="0"), "main", 1000.0, cost, rows=8000, val_rows=2000, now=1000.0)
    assert none.search_until == 1000.0 and none.rungs == () and none.refit_epochs == (left - 5) // 50
    assert "no search (search_share=0)" in none.line()
    # without rungs a trial's epochs are capped so that 3 trials fit the search (`epochs` caps further)
    plain = make_plan(s.replace(rungs="off", epochs=100, search_share="0.5"), "main", 1000.0, cost, rows=8000,
                      val_rows=2000, now=1000.0)
    assert plain.rungs == () and plain.trial_epochs == int((1799 / 3 - 5 - 2) // (40 + 10 / 3)) == 13
    # given refit epochs are kept; `search` spends it all; `refit` spends it all on the refit
    assert make_plan(s.replace(refit_epochs=5), "main", 1000.0, cost, rows=8000, val_rows=2000, now=1000.0).refit_epochs == 5
    # the reserve grows by the test's forward passes at a third of a trained image's cost (0.005 s):
    # 2,000 test images through six views, and the latency batches, 21,216 images: 35.4 s more
    assert forward_images({"tta": "flip_shift"}, 2000) == 6 * (2000 + 6 * 256) and forward_images({}, 100) == 700
    tested = make_plan(s, "main", 1000.0, cost, rows=8000, val_rows=2000, forward_images=21_216, now=1000.0)
    assert tested.reserve == pytest.approx(46 + 21_216 * 0.005 / 3) and plan.reserve == 46
    assert tested.search_until < plan.search_until and "kept for the test and logging" in tested.line()
    assert make_plan(s, "search", 1000.0, cost, rows=8000, val_rows=2000, forward_images=21_216, now=1000.0).reserve == 46
    assert make_plan(s, "search", 1000.0, cost, rows=8000, val_rows=2000, now=1000.0).search_until == 1000 + left
    assert make_plan(s, "refit", 1000.0, cost, rows=8000, val_rows=2000, now=1000.0).refit_epochs == (left - 5) // 50
    # explicit rungs are the study's, not the planner's
    assert make_plan(s.replace(rungs="1,3"), "main", 1000.0, cost, rows=8000, val_rows=2000, now=1000.0).rungs == ()


def test_the_search_share_grows_with_the_full_runs_the_budget_pays_for():
    assert search_share_for(1) == 0.15 and search_share_for(2) == 0.5 and search_share_for(4) == 0.75
    assert search_share_for(1.1) == pytest.approx(0.15 * 1.1 ** 0.5)  # near one run: more than the time beyond it
    assert search_share_for(0.1) == 0.1 and search_share_for(100) == 0.75  # between MIN_SHARE and MAX_SHARE


def test_planned_rungs_are_equal_time_eta_apart_and_fewer_on_a_short_budget():
    cost = Cost(setup=1.0, batch=0.1, batch_size=100)  # one epoch of 8,000 + 2,000 images: 9.7 s with its setup
    assert planned_rung_seconds(3000, cost, 8000, 2000, eta=3) == [74.9, 224.8, 674.3]  # 4 1/3 top-rung evaluations
    assert planned_rung_seconds(3000, cost, 8000, 2000, eta=3, cap=300) == [33.3, 100.0, 300.0]  # no longer than the refit
    assert planned_rung_seconds(300, cost, 8000, 2000, eta=3) == [31.3, 94.0]  # two where three start below an epoch
    assert planned_rung_seconds(60, cost, 8000, 2000, eta=3) == [18.0]  # one rung of 3 evaluations where two start below
    assert planned_rung_seconds(30, cost, 8000, 2000, eta=3) == []  # not even that: plain trials
    assert epochs_in(100.0, 10.0, 30.0) == 3 and epochs_in(20.0, 10.0, 30.0) == 1  # an evaluation trains


def test_evaluation_estimates_learn_fixed_and_per_epoch_seconds():
    cost = Cost(setup=2.0, batch=0.1, batch_size=100)
    assert evaluation_seconds(3, [], None, 1000, 0) is None
    assert evaluation_seconds(3, [], cost, 1000, 0) == pytest.approx(2 + 3 * 1.0 + 2)
    assert evaluation_seconds(9, [(1, 5.0), (3, 9.0), (1, 5.0)], cost, 1000, 0) == pytest.approx(3 + 9 * 2)


@pytest.mark.parametrize("rungs", ["3,1", "0,2", "1,1", "a", "1,,3"])
def test_bad_rungs_are_one_line_errors(rungs):
    with pytest.raises(PipelineError, match="rungs="):
        Settings(rungs=rungs)


def test_due_promotions_take_the_top_share_of_each_rung(tmp_path):
    study = optuna.create_study(direction="maximize")
    for number, (rung, value) in enumerate([(0, 0.1), (0, 0.9), (0, 0.5), (0, 0.7), (1, 0.8), (1, 0.6)]):
        attrs = {names.RUNG: rung, **({names.PROMOTED_FROM: number - 3} if rung else {})}
        study.add_trial(optuna.create_trial(value=value, user_attrs=attrs))
    # rung 0: 4 complete, top 2 (trials 1 and 3); trial 1 is promoted already (trial 4), trial 2 too
    # (trial 5: promoted from 2 when it ranked higher); rung 1: 2 complete, top 1 is trial 4
    due = [(t.number, rung) for t, rung in due_promotions(study, [1, 3, 9], eta=2)]
    assert due == [(4, 2), (3, 1)]


@pytest.mark.slow
def test_a_time_budgeted_main_stops_starting_evaluations_once_its_search_share_is_spent(tiny, digits, capsys):
    s = tiny.replace(time_budget=40, n_trials=1000, rungs="1,3")  # (40 s plans no rungs: bookkeeping dominates)
    started = time.time()
    outcome = run_study("main", s, digits, load_space(s.search_space), started=started)
    out = capsys.readouterr().out
    plan_line = next(line for line in out.splitlines() if line.startswith("time budget 40 s: search ") and "search until" in line)
    study = outcome.study
    trials = study.trials
    assert 1 <= len(trials) < 1000, "the budget, not n_trials, ended the search"
    assert "no more evaluations start" in out
    parent = next(r for r in runs_of(s.experiment_name) if r.info.run_id == outcome.parent_run_id)
    until = parent.data.metrics["plan_search_until"]
    assert started < until < started + 40
    started_ = [t for t in trials if t.datetime_start]  # (an open promotion waits, unstarted)
    late = [t for t in started_ if t.datetime_start.timestamp() > until]
    completed = [t.datetime_complete for t in trials if t.state.name == "COMPLETE"]
    # none starts after the search share, but one where the study has no result yet: the refit needs
    # one (on a slow machine a 40 s budget's share can end before the first evaluation starts)
    assert started_ and len(late) <= 1, "none starts after the search share"
    assert not late or not [c for c in completed if c <= late[0].datetime_start], "a study with a result started one"
    assert study.user_attrs[names.RUNGS] == [1, 3] and {t.user_attrs[names.RUNG] for t in trials} >= {0}
    assert parent.data.tags["plan"] == plan_line
    assert parent.data.metrics["plan_budget_seconds"] == 40
    assert "refit plan:" in out and outcome.metrics["refit_epochs"] >= 1
    assert 0 < outcome.metrics["test_accuracy"] <= 1


@pytest.mark.drill
@pytest.mark.slow
def test_two_workers_share_rungs_on_one_journal_storage(tiny, tmp_path, digits):
    s = tiny.replace(storage=f"journal://{tmp_path}/study.journal", workers=2, rungs="1,2", eta=2, n_trials=8)
    run("search", s, data=digits)
    study = optuna.load_study(study_name=s.study, storage=journal(tmp_path / "study.journal"))
    trials = study.trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert 8 <= len(done) <= 9, "the budget is global (the two workers may each start one last evaluation)"
    assert len({t.user_attrs[names.WORKER_PID] for t in done}) == 2, "both workers trained"
    assert study.user_attrs[names.RUNGS] == [1, 2] and study.user_attrs[names.ETA] == 2
    promoted = [t for t in trials if names.PROMOTED_FROM in t.user_attrs and t.state.name in ("COMPLETE", "RUNNING")]
    assert promoted, "the top half of rung 0 was promoted"
    keys = [t.user_attrs[names.PROMOTED_FROM] for t in promoted]
    assert len(keys) == len(set(keys)), "no promotion trained twice"
    by_number = {t.number: t for t in trials}
    for t in promoted:
        source = by_number[t.user_attrs[names.PROMOTED_FROM]]
        assert source.state.name == "COMPLETE" and source.user_attrs[names.RUNG] == t.user_attrs[names.RUNG] - 1
        assert t.params == source.params and t.user_attrs[names.FIDELITY_EPOCHS] == 2
        assert t.user_attrs[names.EPOCHS_RUN] <= 2
    assert all(t.user_attrs[names.FIDELITY_EPOCHS] == 1 and t.user_attrs[names.EPOCHS_RUN] == 1
               for t in done if t.user_attrs[names.RUNG] == 0)

    runs = {r.data.tags.get("optuna.trial_number"): r for r in runs_of(s.experiment_name)}
    for t in done:
        run_ = runs[str(t.number)]
        assert run_.data.tags["rung"] == str(t.user_attrs[names.RUNG])
        assert run_.data.tags["fidelity"] == f"{t.user_attrs[names.FIDELITY_EPOCHS]} epochs, {t.user_attrs[names.FIDELITY_ROWS]} rows"
        assert run_.data.params["fidelity_epochs"] == str(t.user_attrs[names.FIDELITY_EPOCHS])
        if names.PROMOTED_FROM in t.user_attrs:
            assert run_.data.tags["promoted_from"] == str(t.user_attrs[names.PROMOTED_FROM])
    parent = next(r for r in runs_of(s.experiment_name) if r.data.tags.get("pipeline.role") == "study")
    folder = tmp_path / "artifacts"
    store_client().download_artifacts(parent.info.run_id, "", str(folder))
    with open(folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"rung", "fidelity_epochs", "fidelity_rows", "promoted_from"} <= set(rows[0])
    assert (folder / "rungs.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path / "worker-logs" / s.study)) == ["worker-0.log", "worker-1.log"]


@pytest.mark.drill
def test_a_killed_workers_rung_evaluation_is_retried(tiny, tmp_path, digits):
    s = tiny.replace(storage=f"journal://{tmp_path}/study.journal", rungs="1,300", eta=2, n_trials=3, patience=300)
    args = [sys.executable, "-m", "pipeline", *s.argv("search")]
    doomed = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    store = journal(tmp_path / "study.journal")
    victim, deadline = None, time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and doomed.poll() is None:
        time.sleep(0.5)
        if s.study in optuna.get_all_study_names(store):
            running = optuna.load_study(study_name=s.study, storage=store).get_trials(states=(optuna.trial.TrialState.RUNNING,))
            victim = next((t for t in running if t.user_attrs.get(names.RUNG) == 1 and names.MLFLOW_RUN_ID in t.user_attrs), None)
    doomed.kill()
    out = doomed.communicate()[0]
    assert victim is not None, f"no rung-1 evaluation started: {out[-2000:]}"

    with pytest.raises(PipelineError, match="has rungs 1,300"):
        run("search", s.replace(rungs="1,2"), data=digits)
    run("search", s.replace(n_trials=4, rungs="1,300", patience=1), data=digits)  # recovers, then trains the retry
    study = optuna.load_study(study_name=s.study, storage=store)
    assert study.trials[victim.number].state.name == "FAIL"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    retry = retries[0]
    assert retry.user_attrs[names.RUNG] == 1
    assert retry.user_attrs[names.PROMOTED_FROM] == victim.user_attrs[names.PROMOTED_FROM]
    runs = {r.data.tags.get("optuna.trial_number"): r for r in runs_of(s.experiment_name)}
    assert runs[str(victim.number)].info.status == "FAILED"
    assert runs[str(retry.number)].info.status == "FINISHED" and runs[str(retry.number)].data.tags["rung"] == "1"


def test_a_study_made_before_rungs_resumes_with_plain_trials(tiny, digits, capsys):
    space = load_space(tiny.search_space)
    s = tiny.replace(n_trials=1, epochs=1)
    study, _ = join_study(s, space)  # as the pipeline made studies before rungs: no `rungs` attr
    tracker = Tracker(s, study)
    run_search(study, Objective(digits, space, s, tracker), s)
    tracker.finish()
    assert names.RUNGS not in study.user_attrs and len(study.trials) == 1

    with pytest.raises(PipelineError, match="was made without rungs"):
        run_study("search", s.replace(n_trials=2, rungs="1,3"), digits, space)
    # n_trials ends the search, not the budget: 60 s leaves room for a trial on a slow machine (30 s
    # left none once: the refit's share and the reserve took the rest); a 1-epoch refit ends it soon
    outcome = run_study("main", s.replace(n_trials=2, time_budget=60, refit_epochs=1), digits, space,
                        started=time.time())
    assert re.search(r"rungs? of", capsys.readouterr().out), "the budget planned rungs, as for a new study"
    assert outcome.study.user_attrs[names.RUNGS] == []
    assert all(names.RUNG not in t.user_attrs for t in outcome.study.trials)
    assert len(outcome.study.trials) == 2 and 0 < outcome.metrics["test_accuracy"] <= 1


def test_a_trial_still_training_when_the_search_share_ends_is_cut(tiny, digits, capsys):
    """A configuration far slower than the estimate must not eat the refit's time: its fit stops at
    the search's end; pruned where the study has a result, kept where it has none."""
    space = load_space(tiny.search_space)
    s = tiny.replace(n_trials=3, epochs=1000, patience=1000, pruner="none")  # minutes of digits, uncut
    for has_result in (False, True):
        study, _ = join_study(s.replace(study_name=f"cut-{has_result}"), space)
        if has_result:  # a result whose seconds nothing estimates from (no epochs_run)
            study.add_trial(optuna.trial.create_trial(value=0.1))
        tracker = Tracker(s, study)
        run_search(study, Objective(digits, space, s, tracker), s, until=time.time() + 5)
        tracker.finish()
        cut = study.trials[-1]
        assert len(study.trials) == 1 + has_result, "nothing starts after the search's end"
        assert cut.state.name == ("PRUNED" if has_result else "COMPLETE")
        assert cut.user_attrs[names.CUT].startswith("the search's share of the time budget ended: fold 1, epoch ")
        run_ = tracker.client.get_run(cut.user_attrs[names.MLFLOW_RUN_ID])
        assert run_.data.tags["optuna.trial_state"] == cut.state.name
        epochs = len(tracker.client.get_metric_history(run_.info.run_id, "val_accuracy"))
        assert 1 <= epochs < 1000
        if not has_result:
            assert cut.user_attrs[names.EPOCHS_RUN] == epochs
    out = capsys.readouterr().out
    assert out.count("cut short, the search's share") == 2 and "kept, the study has no other result" in out


def test_a_search_share_too_short_for_one_evaluation_still_gives_the_refit_one(tiny, digits, capsys):
    """On a slow machine a small budget's probe can leave the search less than an evaluation:
    a study without a result starts one anyway (cut at the share's end, kept); one with a result
    starts none."""
    space = load_space(tiny.search_space)
    s = tiny.replace(n_trials=3, epochs=1000, patience=1000, pruner="none")
    slow = Cost(setup=500.0, batch=50.0, batch_size=32)  # the probe's word: an evaluation takes hours
    for has_result in (False, True):
        study, _ = join_study(s.replace(study_name=f"short-{has_result}"), space)
        if has_result:
            study.add_trial(optuna.trial.create_trial(value=0.1))
        tracker = Tracker(s, study)
        run_search(study, Objective(digits, space, s, tracker), s, until=time.time() + 2, cost=slow)
        tracker.finish()
        assert len(study.trials) == 1, [t.state.name for t in study.trials]
        assert study.trials[0].state.name == "COMPLETE"
        if not has_result:
            assert study.trials[0].user_attrs[names.CUT].startswith("the search's share of the time budget ended")
    out = capsys.readouterr().out
    assert out.count("no more evaluations start") == 2 and "kept, the study has no other result" in out


def test_warm_starts_take_their_place_at_the_lowest_rung(tiny, digits):
    """Warm starts are enqueued before the rungs are fixed: a fresh study so started is not taken
    for one made before rungs."""
    space = load_space(tiny.search_space)
    warm = {"known": space.complete({"depth": 1, "conv1_filters": 8, "conv1_kernel_size": 3, "dense_units": 64})}
    outcome = run_study("search", tiny.replace(n_trials=1, rungs="1,2", eta=2), digits, space, warm=warm)
    study = outcome.study
    assert study.user_attrs[names.RUNGS] == [1, 2]
    first = study.trials[0]
    assert first.user_attrs[names.WARM_START] == "known" and first.user_attrs[names.RUNG] == 0
    assert first.user_attrs[names.FIDELITY_EPOCHS] == 1 and first.state.name == "COMPLETE"


@pytest.mark.drill
@pytest.mark.slow
def test_workers_under_a_budget_train_the_plans_capped_trials(tiny, tmp_path, digits, capsys):
    """Without rungs a budget caps a trial's epochs; the workers `workers=2` starts train that cap,
    not `epochs` (which, with a patience as long, would run each trial past the budget). The budget
    starts now, not at this pytest process's start; a 1-epoch refit leaves the search most of it."""
    s = tiny.replace(storage=f"journal://{tmp_path}/study.journal", workers=2, rungs="off", time_budget=60,
                     epochs=2000, patience=2000, n_trials=4, refit_epochs=1)
    outcome = run_study("main", s, digits, load_space(s.search_space), started=time.time(), device="main's device")
    cap = int(re.search(r"trials of at most (\d+) epoch", capsys.readouterr().out).group(1))
    assert cap < 2000
    study = optuna.load_study(study_name=s.study, storage=journal(tmp_path / "study.journal"))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done and all(t.user_attrs[names.EPOCHS_RUN] <= cap for t in done), [t.user_attrs for t in done]
    runs = runs_of(s.experiment_name)  # the workers tag their own trials' device, not the parent's
    assert next(r for r in runs if r.info.run_id == outcome.parent_run_id).data.tags["device"] == "main's device"
    trial_devices = {r.data.tags.get("device") for r in runs if r.data.tags.get("mlflow.runName", "").startswith("trial-")}
    assert trial_devices and all(d.startswith("CPU (") for d in trial_devices), trial_devices

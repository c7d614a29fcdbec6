"""The search earns its time (issue 36): equal-time rungs (a cheaper configuration trains more
epochs in its rung's seconds), the space's default as the first evaluation of every rung and as
the control the refit keeps unless a challenger beats it beyond the noise, `search_share=0`,
an invalid default, and a study made before equal-time rungs that still resumes.

Real training on digits; no timing is asserted: epoch costs are given to the study as records,
so that what an evaluation trains follows from them alone.
"""

from __future__ import annotations

import optuna
import pytest

from pipeline import names
from pipeline.best import best_trial, verdict_of
from pipeline.budget.plan import cost_key
from pipeline.budget.prior import PriorSampler, around, noise
from pipeline.core import run_study
from pipeline.errors import PipelineError
from pipeline.space import load_space
from pipeline.study import join_study

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
SPACE = """\
depth: 1
first_block: {filters: [4, 32], kernel_size: 3, pool_size: 2}
dense: {units: {low: 8, high: 64}}
training: {learning_rate: {low: 0.0005, high: 0.01, log: true}}
default: {depth: 1, conv1_filters: 4, dense_units: 32, learning_rate: 0.002}
"""


@pytest.fixture
def spaced(settings, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(SPACE)
    return settings.replace(search_space=str(path), patience=100, pruner="none")


def _equal_time_study(s, space, seconds, costs):
    """A study whose equal-time rungs and epoch costs are given, as a budget's plan and earlier
    evaluations would have recorded them."""
    study, _ = join_study(s, space)
    study.set_user_attr(names.RUNGS, [1, 3])
    study.set_user_attr(names.RUNG_SECONDS, seconds)
    study.set_user_attr(names.ETA, 2)
    study.set_user_attr(names.COSTS, costs)
    return study


def test_a_cheaper_configuration_trains_more_epochs_in_the_same_seconds(spaced, digits):
    space = load_space(spaced.search_space)
    cheap = space.complete({"depth": 1, "conv1_filters": 4, "dense_units": 8, "learning_rate": 0.002})
    dear = {**cheap, "conv1_filters": 32}
    s = spaced.replace(n_trials=2, rungs="1,3")
    study = _equal_time_study(s, space, [8.0, 24.0], {cost_key(cheap): [0.0, 0.5], cost_key(dear): [0.0, 1.5]})
    study.enqueue_trial(dear)
    study.enqueue_trial(cheap)
    run_study("search", s.replace(search_space=s.search_space), digits, space)
    by_filters = {t.params["conv1_filters"]: t for t in study.trials if t.state.name == "COMPLETE"
                  and t.user_attrs.get(names.RUNG) == 0 and not t.user_attrs.get(names.CONTROL)}
    # 8 s less 2 s of bookkeeping: 6 s at 0.5 s an epoch is 12 epochs, at 1.5 s 4
    assert by_filters[4].user_attrs[names.FIDELITY_EPOCHS] == 12 and by_filters[32].user_attrs[names.FIDELITY_EPOCHS] == 4
    assert {t.user_attrs[names.FIDELITY_SECONDS] for t in by_filters.values()} == {8.0}
    assert all(t.user_attrs[names.EPOCHS_RUN] == t.user_attrs[names.FIDELITY_EPOCHS] for t in by_filters.values())
    # every evaluation of the study trains from the same seed, and its cost is then measured
    assert set(study.user_attrs[names.COSTS]) >= {cost_key(cheap), cost_key(dear)}
    assert study.user_attrs[names.COSTS][cost_key(cheap)] != [0.0, 0.5], "the record is replaced by a measurement"


def test_the_default_is_the_first_evaluation_of_every_rung(spaced, digits, capsys):
    space = load_space(spaced.search_space)
    s = spaced.replace(n_trials=6, rungs="1,3")
    study = _equal_time_study(s, space, [3.0, 6.0], {})
    run_study("search", s, digits, space)
    assert "the space's default is the first evaluation" in capsys.readouterr().out
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    by_rung = {}
    for t in trials:
        by_rung.setdefault(t.user_attrs[names.RUNG], []).append(t)
    assert set(by_rung) == {0, 1}, "some evaluation was promoted"
    for rung, evaluations in by_rung.items():
        first = min(evaluations, key=lambda t: t.number)
        assert first.user_attrs.get(names.CONTROL) is True, (rung, first.params)
        assert first.params == {k: v for k, v in space.default.items() if k in first.params}
    assert all(t.user_attrs[names.FIDELITY_VAL_ROWS] > 0 for t in trials)


def test_a_search_too_short_for_two_rungs_still_compares_at_equal_time(spaced, digits, capsys):
    """One equal-time rung (a budget whose search share pays for three evaluations of an epoch or
    so): the default first, its challengers in the same seconds, and the verdict at that rung."""
    space = load_space(spaced.search_space)
    s = spaced.replace(n_trials=3, rungs="2")
    study, _ = join_study(s, space)
    study.set_user_attr(names.RUNGS, [2])
    study.set_user_attr(names.RUNG_SECONDS, [4.0])
    study.set_user_attr(names.ETA, 3)
    run_study("search", s, digits, space)
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 3 and min(trials, key=lambda t: t.number).user_attrs.get(names.CONTROL) is True
    assert all(t.user_attrs[names.RUNG] == 0 and t.user_attrs[names.FIDELITY_SECONDS] == 4.0 for t in trials)
    assert all(names.PROMOTED_FROM not in t.user_attrs for t in study.trials), "one rung promotes nothing"
    verdict = verdict_of(study, s)
    assert verdict.rung == 0 and verdict.default.user_attrs.get(names.CONTROL) is True
    assert verdict.line(s.sign) in capsys.readouterr().out


def _rung_study(values: dict, rows: int = 400, rung: int = 1, study=None):
    """A study with rungs whose rung-`rung` evaluations score `values` ({"default": v, "a": v, ...})."""
    if study is None:
        study = optuna.create_study(direction="maximize")
        study.set_user_attr(names.RUNGS, [1, 3])
    for name, value in values.items():
        attrs = {names.RUNG: rung, names.FIDELITY_VAL_ROWS: rows, names.PARAMS: {"name": name},
                 names.FIDELITY_SECONDS: 30.0}
        if name == "default":
            attrs[names.CONTROL] = True
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs=attrs))
    return study


def test_a_challenger_within_the_noise_does_not_replace_the_default(settings):
    assert noise(0.8, 400) == pytest.approx((2 * 0.8 * 0.2 / 400) ** 0.5)  # 2.8 points
    close = _rung_study({"default": 0.80, "a": 0.82, "b": 0.79})
    assert best_trial(close, settings).user_attrs[names.PARAMS] == {"name": "default"}
    line = verdict_of(close, settings).line()
    assert line.startswith("refit takes the default: the best challenger at rung 1 (30 s), trial 1, is +2.0 points")
    ahead = _rung_study({"default": 0.80, "a": 0.85, "b": 0.79})
    assert best_trial(ahead, settings).user_attrs[names.PARAMS] == {"name": "a"}
    assert verdict_of(ahead, settings).line() == "refit takes trial 1: it beats the default at rung 1 (30 s) by 5.0 points (noise 2.8)"
    # more validation rows, less noise: the same lead of 2 points is enough
    assert best_trial(_rung_study({"default": 0.80, "a": 0.82}, rows=10_000), settings).user_attrs[names.PARAMS] == {"name": "a"}
    # the comparison is at the highest rung where the default and a challenger both are: the default
    # promoted alone (no challenger's promotion had time) is compared at rung 0
    low = _rung_study({"default": 0.40, "a": 0.50}, rung=0)
    _rung_study({"default": 0.60}, rung=1, study=low)
    assert best_trial(low, settings).user_attrs[names.PARAMS] == {"name": "a"}
    assert verdict_of(low, settings).line().startswith("refit takes trial 1: it beats the default at rung 0 (30 s) by 10.0")
    near = _rung_study({"default": 0.40, "a": 0.42}, rung=0)
    _rung_study({"default": 0.60}, rung=1, study=near)
    assert best_trial(near, settings).user_attrs[names.PARAMS] == {"name": "default"}
    # a loss is no share: any lead counts
    loss = settings.replace(metric="val_loss", direction="minimize")
    lower = optuna.create_study(direction="minimize")
    lower.set_user_attr(names.RUNGS, [1, 3])
    for value, control in ((0.50, True), (0.49, False)):
        lower.add_trial(optuna.trial.create_trial(value=value, user_attrs={names.RUNG: 1, names.CONTROL: control,
                                                                           names.FIDELITY_VAL_ROWS: 400}))
    assert not best_trial(lower, loss).user_attrs[names.CONTROL]


def test_an_invalid_default_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SPACE.replace("conv1_filters: 4,", "conv1_filters: 7,"))
    with pytest.raises(PipelineError, match=rf"^{path}: key 'default' is outside search space {path}: "
                                            r"conv1_filters=7 is outside the space$"):
        load_space(path)
    path.write_text(SPACE.replace("default: {", "default: [").replace("0.002}", "0.002]"))
    with pytest.raises(PipelineError, match=rf"^{path}: key 'default' must be a mapping of params"):
        load_space(path)
    # the default is not part of the space's identity: a study made before it was declared resumes
    plain = tmp_path / "plain.yaml"
    plain.write_text(SPACE.split("default:")[0])
    assert load_space(plain).digest == load_space(tmp_path / "plain.yaml").digest
    path.write_text(SPACE)
    assert load_space(path).digest == load_space(plain).digest and load_space(plain).default is None


def test_search_share_zero_trains_the_default_without_a_search(spaced, digits, capsys):
    s = spaced.replace(time_budget=30, search_share="0", n_trials=5)
    outcome = run_study("main", s, digits, load_space(s.search_space), started=__import__("time").time())
    out = capsys.readouterr().out
    assert "no search (search_share=0)" in out and "refit: the default, unsearched," in out
    assert outcome.study.trials == [] and 0 < outcome.metrics["test_accuracy"] <= 1
    with pytest.raises(PipelineError, match="search_share=0: .* declares no default and no warm_start is given"):
        plain = spaced.replace(search_space=str(spaced.search_space).replace("tiny.yaml", "plain.yaml"))
        open(plain.search_space, "w").write(SPACE.split("default:")[0])
        run_study("main", plain.replace(time_budget=30, search_share="0"), digits, load_space(plain.search_space))
    with pytest.raises(PipelineError, match=r"^search_share='1.5': expected auto or a number in \[0, 1\)$"):
        spaced.replace(search_share="1.5")


def test_a_study_made_before_equal_time_rungs_resumes_with_epoch_rungs(spaced, digits):
    """Studies with rungs made before this change store epochs per rung and no control: a resume
    keeps their epoch rungs, and the default joins as the control."""
    space = load_space(spaced.search_space)
    s = spaced.replace(n_trials=3, rungs="1,2")
    study, _ = join_study(s, space)
    study.set_user_attr(names.RUNGS, [1, 2])
    study.set_user_attr(names.ETA, 2)
    old = {"depth": 1, "conv1_filters": 32, "conv1_kernel_size": 3, "conv1_pool_size": 2, "dense_units": 16,
           "learning_rate": 0.003}
    searched = _distributions(space, old)
    study.add_trial(optuna.trial.create_trial(
        params={k: old[k] for k in searched}, distributions=searched, value=0.5,
        user_attrs={names.RUNG: 0, names.FIDELITY_EPOCHS: 1, names.PARAMS: space.complete(old), names.EPOCHS_NEEDED: 1,
                    names.EPOCHS_RUN: 1}))
    run_study("search", s, digits, space)
    new = [t for t in study.trials if t.number > 0 and t.state.name == "COMPLETE"]
    assert new and all(t.user_attrs[names.FIDELITY_EPOCHS] in (1, 2) for t in new)
    assert all(names.FIDELITY_SECONDS not in t.user_attrs for t in new)
    assert names.RUNG_SECONDS not in study.user_attrs
    assert any(t.user_attrs.get(names.CONTROL) for t in new), "the default joins as the control"


def _distributions(space, params):
    """The Optuna distributions of `params` in `space`, as a trial of the study would have them."""
    trial = optuna.trial.FixedTrial(params)
    space.sample(trial)
    return trial.distributions


def test_prior_draws_stay_near_the_default_and_inside_the_space():
    rng = __import__("numpy").random.default_rng(0)
    log = optuna.distributions.FloatDistribution(0.0005, 0.01, log=True)
    draws = [around(0.002, log, 0.15, rng) for _ in range(200)]
    assert all(0.0005 <= d <= 0.01 for d in draws) and 0.0012 < sorted(draws)[100] < 0.0035
    ints = optuna.distributions.IntDistribution(8, 64, step=8)
    assert {around(32, ints, 0.15, rng) % 8 for _ in range(50)} == {0}
    choices = optuna.distributions.CategoricalDistribution([4, 32])
    kept = sum(around(4, choices, 0.15, rng) == 4 for _ in range(400))
    assert 0.7 * 400 < kept < 0.9 * 400  # KEEP (0.6) plus half of the uniform draws
    # without a default the sampler is its base alone
    base = optuna.samplers.RandomSampler(seed=1)
    assert PriorSampler(base, None, 1)._way(None, optuna.trial.FixedTrial({})) == "base"

"""bench/budget_suite.py's KerasTuner side on digits, with real Keras and KerasTuner: the adapter
declares every searched setting of the shipped spaces, Hyperband's best is a configuration of the
space that the pipeline takes as a warm start, and the whole side (search killed at its share,
then our planner's refit) leaves a record. No timing assertions."""

from __future__ import annotations

import sys

import keras_tuner
import pytest
from conftest import ROOT

from pipeline.space import load_space
from pipeline.warm_start import load_configurations

sys.path.insert(0, str(ROOT / "bench"))
import budget_suite  # noqa: E402


def deepest(space) -> int:
    dim = space.depth
    return {"fixed": lambda: dim.value, "choice": lambda: max(dim.choices)}.get(dim.kind, lambda: int(dim.high))()


@pytest.mark.parametrize("name", ["seed.yaml", "photos.yaml", "airbench.yaml", "modern.yaml"])
def test_the_adapter_declares_every_searched_setting_of_the_space(name):
    space = load_space(ROOT / "search_spaces" / name)
    hp = keras_tuner.HyperParameters()
    space.sample(budget_suite.Suggest(hp, declare=True))
    expected = space._expected(deepest(space))
    searched = {key for key, (dim, _) in expected.items() if dim.kind != "fixed"}
    assert searched, name
    declared = {h.name: h for h in hp.space}
    assert set(declared) == searched  # every searched key, and nothing that is not one
    for key in searched:  # each declared as what it is in the space
        dim = expected[key][0]
        if dim.kind == "choice":
            assert type(declared[key]).__name__ == "Choice", key
            assert len(declared[key].values) == len(dim.choices), key
        else:
            assert type(declared[key]).__name__ == ("Int" if dim.kind == "int" else "Float"), key
            assert (declared[key].min_value, declared[key].max_value) == (dim.low, dim.high), key
            assert declared[key].sampling == ("log" if dim.log else "linear"), key


def test_hyperband_on_digits_gives_a_configuration_of_the_space_the_pipeline_takes(tmp_path):
    space = load_space(budget_suite.DATASETS["digits"].space)
    budget_suite.kerastuner_search("digits", 42, tmp_path / "kt", max_epochs=3, iterations=1, threads=0)
    best, completed = budget_suite.kt_best("digits", tmp_path / "kt")
    assert completed >= 4  # a bracket of 1-epoch trials, its promotion to 3 epochs, and more
    assert best["epochs"] in (1, 3) and 0 < best["score"] <= 1
    params = best["params"]
    assert space.violations(space.complete(params)) == []
    warm = tmp_path / "best.yaml"
    budget_suite.write_warm_start(warm, budget_suite.DATASETS["digits"].space, params, best["trial_id"])
    _, configs = load_configurations(warm, space)
    assert list(configs.values()) == [space.complete(params)]


@pytest.mark.slow
def test_the_kerastuner_side_searches_until_its_share_then_refits_its_best(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_suite, "RESULTS", tmp_path)
    job = budget_suite.Job("digits", 60, "kerastuner", 42)
    record = budget_suite.run_job(job, core=None, kt_share=0.5)
    assert job.record.exists() and record["side"] == "kerastuner"
    assert record["kt_share_source"] == "--kt-share 0.5"
    assert record["configurations"] >= 1 and record["kt_best"] is not None
    space = load_space(budget_suite.DATASETS["digits"].space)
    assert space.violations(space.complete(record["kt_best"]["params"])) == []
    assert record["refit_budget_s"] < 60 and 0 < record["test_accuracy"] <= 1
    assert "--warm-start" in record["command"] and "--search-share 0" in record["command"]

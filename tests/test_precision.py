"""Issue 37 (the CPU's fast path): the `precision` setting. bfloat16 trains under Keras'
`mixed_bfloat16` and the model the pipeline logs and serves predicts float32; `auto` follows the
CPU's flags (forced through PIPELINE_CPU_FLAGS); a bad value is a one-line error; the probe of a
time budget trains in the chosen policy and the plan line names it. Tiny data, no timing."""

from __future__ import annotations

import math

import keras
import mlflow
import numpy as np
import pytest

from pipeline.budget.plan import make_plan
from pipeline.budget.probe import probe
from pipeline.cli import main
from pipeline.config import Settings
from pipeline.device import configure, cpu_bfloat16, cpu_flags, dtype_policy
from pipeline.model import for_serving
from pipeline.serving import log_models
from pipeline.train import fit_full

TINY = {"depth": 1, "conv1_filters": 8, "conv1_kernel_size": 3, "conv1_pool_size": 2, "dense_units": 16,
        "batch_size": 64}


@pytest.fixture(autouse=True)
def _float32_after():
    """Keras' global policy back to float32 after each test, as the other tests expect it."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_bfloat16_trains_and_the_served_model_predicts_float32(tracking_uri, digits):
    assert "mixed_bfloat16 (precision=bfloat16)" in configure(Settings(precision="bfloat16"))
    model = fit_full(TINY, digits.x_train[:256], digits.y_train[:256], digits.input_shape, digits.n_classes, epochs=1)
    assert dtype_policy() == "mixed_bfloat16"  # fit_full's clear_session kept the policy
    assert any(layer.compute_dtype == "bfloat16" for layer in model.layers)
    assert model.get_layer("probabilities").compute_dtype == "float32"
    served = for_serving(model)
    x = digits.x_train[:4]
    here = served.predict(x, verbose=0)
    assert here.dtype == np.float32 and math.isclose(float(here.sum()), 4.0, rel_tol=1e-5)
    client = mlflow.tracking.MlflowClient()  # not mlflow.start_run: its active experiment may be an earlier test's
    run = client.create_run(client.create_experiment("precision"))
    info = log_models(served, x, digits.class_names, run.info.run_id, "bf16-model")  # as pipeline.refit logs it
    keras.mixed_precision.set_global_policy("float32")  # a serving process starts in Keras' default
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    loaded = pyfunc.unwrap_python_model().model
    probabilities = loaded.predict(x, verbose=0)
    assert probabilities.dtype == np.float32 and loaded.outputs[0].dtype == "float32"
    np.testing.assert_allclose(probabilities, here, atol=1e-6)  # the served model computes what was scored
    frame = pyfunc.predict(np.asarray(x, dtype="uint8"))
    assert list(frame["class"]) == [digits.class_names[i] for i in here.argmax(axis=1)]


def test_auto_trains_in_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.setenv("PIPELINE_CPU_FLAGS", "fpu sse2 avx2")
    assert "float32 (auto: no bfloat16 flag)" in configure(Settings())
    assert dtype_policy() == "float32"
    monkeypatch.setenv("PIPELINE_CPU_FLAGS", "avx512f avx512_bf16")
    assert "mixed_bfloat16 (auto: avx512_bf16)," in configure(Settings())
    assert dtype_policy() == "mixed_bfloat16"
    assert "float32," in configure(Settings(precision="float32"))  # float32 whatever the CPU computes
    assert dtype_policy() == "float32"
    assert cpu_bfloat16({"avx512_bf16", "amx_bf16", "amx_tile"}) == "amx_bf16"  # AMX named first
    monkeypatch.delenv("PIPELINE_CPU_FLAGS")
    assert cpu_flags() >= {"fpu"}  # /proc/cpuinfo's, on Linux


def test_a_bad_precision_is_a_one_line_error_before_anything_is_recorded(tmp_path, settings, capsys):
    for args, error in ((["--precision", "half"], "error: precision='half': must be one of auto, float32, bfloat16\n"),
                        (["--precision", "float32", "--mixed-precision", "1"],
                         "error: precision='float32': contradicts mixed_precision=1 (use auto)\n")):
        assert main(["search", *args, "--storage", settings.storage, "--study-name", "p"]) == 2
        assert capsys.readouterr().err == error
    assert not (tmp_path / "optuna.db").exists()  # refused before any storage was opened


def test_the_budgets_probe_trains_in_the_chosen_precision_and_the_plan_line_names_it(digits):
    settings = Settings(precision="bfloat16", time_budget=600)
    configure(settings)
    cost = probe(TINY, digits.x_train, digits.y_train, range(len(digits.y_train)), digits.input_shape,
                 digits.n_classes, warmup=1, batches=2)
    assert cost.batch > 0 and dtype_policy() == "mixed_bfloat16"  # the probe's clear_session kept it
    plan = make_plan(settings, "main", 0.0, cost, rows=1000, val_rows=200, now=1.0, precision=dtype_policy())
    assert plan.line().startswith("time budget 600 s: ") and plan.line().endswith(", training in mixed_bfloat16")

"""Issue 13: Keras 3 backends. A search + refit + registered, served model on the JAX backend
in processes where TensorFlow cannot be imported (tests/without_tensorflow on PYTHONPATH),
the model trained there loaded and run by this TensorFlow process, and the backend setting's
checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from conftest import ROOT, runs_of, serve_and_ask

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.device import use_backend
from pipeline.errors import PipelineError

pytest.importorskip("jax", reason="the JAX backend is not installed (make test installs requirements-jax.txt)")
WITHOUT_TF = os.pathsep.join([str(ROOT / "tests" / "without_tensorflow"), str(ROOT)])  # a PYTHONPATH


@pytest.mark.drill
@pytest.mark.slow
def test_jax_without_tensorflow_searches_refits_registers_and_serves(tmp_path, tracking_uri, digits, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", WITHOUT_TF)  # every process below: no TensorFlow
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "main", "--backend", "jax", "--n-trials", "2", "--epochs", "2",
         "--storage", f"sqlite:///{tmp_path}/optuna.db", "--study-name", "jax-study",
         "--experiment-name", "jax", "--search-space", str(ROOT / "search_spaces" / "seed.yaml")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test_accuracy=" in done.stdout and "registered model: jax-study/1" in done.stdout
    runs = runs_of("jax")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("trial-")]
    assert parent.data.params["keras_backend"] == "jax" and len(trials) == 2
    for r in (parent, *trials):
        assert r.data.tags["device"].startswith("CPU (") and r.data.tags["device"].endswith(", float32 (auto: no bfloat16 flag), jax)")
    assert parent.data.metrics["test_accuracy"] > 0.5

    # served by `mlflow models serve` in a process without TensorFlow: it loads on JAX
    images = digits.test.x[:4]
    answer = serve_and_ask("models:/jax-study/1", {"inputs": images.tolist()}, tracking_uri, timeout=120)
    served = np.array([[row[f"p_{c}"] for c in digits.class_names] for row in answer["predictions"]])

    # and the same saved model loads under this process's TensorFlow backend, predicting the same
    monkeypatch.delenv("PYTHONPATH")
    model = mlflow.pyfunc.load_model("models:/jax-study/1")
    here = model.predict(images)
    np.testing.assert_allclose(here[[f"p_{c}" for c in digits.class_names]].to_numpy(), served, atol=1e-5)
    assert list(here["class"]) == [row["class"] for row in answer["predictions"]]


def test_the_backend_setting_is_checked(monkeypatch, capsys):
    with pytest.raises(PipelineError, match=r"^backend='mxnet': must be one of tensorflow, jax, torch$"):
        Settings(backend="mxnet")
    monkeypatch.setenv("KERAS_BACKEND", "theano")
    assert main(["space", "--samples", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: KERAS_BACKEND='theano': must be one of tensorflow, jax, torch"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert Settings().keras_backend == "jax" and Settings(backend="torch").keras_backend == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    assert Settings().keras_backend == "tensorflow"
    import keras  # this process runs Keras on TensorFlow: another backend is refused, not half applied

    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(PipelineError, match="Keras already runs on 'tensorflow'"):
        use_backend("jax")
    assert os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow"


JAX_CIFAR_KEYS = """
import json, sys
import keras, numpy as np
from pipeline.model import with_tta
from pipeline.train import KeepModel, fit_full, train, validation_splits
assert keras.backend.backend() == "jax" and "tensorflow" not in sys.modules
params = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
x, y = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8), np.arange(64) % 4
keep = KeepModel()
metrics = train(params, validation_splits(x, y, 1, 0.25, 0)[0], (16, 16, 3), 4, epochs=1, callbacks=[keep])
assert metrics["epochs_run"] == 1 and np.isfinite(metrics["train_loss"]), metrics
served = with_tta(keep.model, params["tta"])  # as the refit serves it
served.save(sys.argv[2])
loaded = keras.saving.load_model(sys.argv[2])
np.testing.assert_allclose(loaded.predict(x, verbose=0), served.predict(x, verbose=0), atol=1e-6)
# lookahead's copy of the average reaches JAX's training state: the fit ends elsewhere than ema's
fit = lambda kind: fit_full({**params, "weight_average": kind, "batch_size": 8}, x, y, (16, 16, 3), 4, epochs=2,
                            seed=0).get_weights()
assert any(not np.allclose(a, b) for a, b in zip(fit("ema"), fit("lookahead"))), "lookahead trained as ema"
print("fitted, saved and loaded on jax")
"""


@pytest.mark.slow
def test_the_fast_cifar_keys_fit_save_and_load_on_jax(tmp_path, monkeypatch):
    """Every key of tests/test_cifar_keys.py (issue 20) on JAX, without TensorFlow: one epoch of
    tiny data, the saved model (with its test-time views) loads and predicts the same, and
    `weight_average: lookahead` trains from the average (not as `ema`). PyTorch is not
    installed here."""
    from test_cifar_keys import BASE, NEW

    monkeypatch.setenv("PYTHONPATH", WITHOUT_TF)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    done = subprocess.run([sys.executable, "-c", JAX_CIFAR_KEYS, json.dumps({**BASE, **NEW}), str(tmp_path / "m.keras")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fitted, saved and loaded on jax" in done.stdout, done.stderr[-3000:]

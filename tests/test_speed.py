"""Issue 5 (speed): the data path (one tensor pool, index splits, tf.data batches), the
device settings (threads, batch size, mixed precision) and their MLflow tags, and a smoke
run of bench/overhead.py. No timing thresholds: the machine is shared."""

from __future__ import annotations

import math
import sys

import keras
import numpy as np
import optuna
import pytest
from conftest import ROOT, runs_of

from pipeline.cli import main, run
from pipeline.model import build_model
from pipeline.train import train, validation_splits


def test_splits_share_one_tensor_pool_and_batches_read_the_right_rows(digits):
    x, y = digits.x_train, digits.y_train
    splits = validation_splits(x, y, 3, 0.2, seed=0)
    assert len({id(s.images) for s in splits}) == 1  # converted once, shared by every fold
    assert sorted(np.concatenate([s.val_rows for s in splits]).tolist()) == list(range(len(y)))
    split = splits[0]
    assert not set(split.train_rows) & set(split.val_rows)
    images, labels = zip(*[(a.numpy(), b.numpy()) for a, b in split.val_batches(64)])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.dtype == np.uint8 and images.shape == (len(split.val_rows), *x.shape[1:])
    np.testing.assert_array_equal(images, x[split.val_rows])
    np.testing.assert_array_equal(labels, y[split.val_rows])
    # training batches are a reshuffled permutation of the train rows each epoch
    first, second = ([int(v) for b in split.train_batches(64, seed=1) for v in b[1].numpy()] for _ in range(2))
    assert sorted(first) == sorted(second) == sorted(y[split.train_rows].tolist())


def test_device_and_batch_size_are_logged_on_parent_and_trial_runs(settings, digits):
    run("search", settings.replace(n_trials=1, epochs=1, batch_size=64, threads=2), data=digits)
    runs = runs_of("test-experiment")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trial = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    for r in (parent, trial):
        assert r.data.tags["device"].startswith("CPU (") and "float32" in r.data.tags["device"]
    assert trial.data.params["batch_size"] == "64"  # the override, not the space's 32
    study = optuna.load_study(study_name="test-study", storage=settings.storage)
    assert study.trials[0].user_attrs["params"]["batch_size"] == 64


def test_mixed_precision_on_a_cpu_is_refused_before_anything_is_recorded(tmp_path, settings, capsys):
    code = main(["search", "--mixed-precision", "1", "--storage", settings.storage, "--study-name", "mp"])
    assert code == 2
    assert "error: mixed_precision=1: needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()  # refused before any storage was opened


def test_mixed_float16_model_keeps_a_float32_softmax_and_trains(digits):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model({"depth": 1, "conv1_filters": 8, "conv1_kernel_size": 3, "conv1_pool_size": 2,
                             "dense_units": 16}, digits.input_shape, digits.n_classes)
        assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
        assert model.outputs[0].dtype == "float32"
        assert any(layer.compute_dtype == "float16" for layer in model.layers)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # compile adds loss scaling
        history = model.fit(digits.x_train[:256], digits.y_train[:256], epochs=1, batch_size=64, verbose=0).history
        assert math.isfinite(history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_overhead_bench_runs_and_ends_with_the_ratio(tracking_uri, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import overhead

    out = overhead.main(["--repeats", "1", "--epochs", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.split()[-1].startswith("overhead_ratio=")
    assert math.isfinite(out["overhead_ratio"]) and out["overhead_ratio"] > 0
    assert out["bare_epoch_s"] > 0 and out["pipeline_epoch_s"] > 0


@pytest.mark.slow
def test_search_vs_random_bench_runs_both_sides_and_ends_with_the_verdict(tracking_uri, tmp_path, capsys):
    """Both sides on digits, a budget of 1 s each (the first trial always runs): trials, refits, the per-trial CSV."""
    sys.path.insert(0, str(ROOT / "bench"))
    import search_vs_random

    csv_file = tmp_path / "trials.csv"
    out = search_vs_random.main(["--dataset", "digits", "--budget-minutes", "0.02", "--epochs", "1",
                                 "--trials-csv", str(csv_file)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.split()[-1].startswith("target_met=")
    assert out["pruner"] == "median"
    for side in ("pipeline", "random"):
        assert out[f"{side}_complete"] >= 1 and 0 < out[f"{side}_test_accuracy"] <= 1
    assert out["random_s_to_random_best"] > 0
    rows = csv_file.read_text().splitlines()
    assert rows[0].startswith("seed,side,number,state") and len(rows) - 1 >= 2


def test_train_reports_the_best_epoch_from_the_tf_data_path(digits):
    split = validation_splits(digits.x_train, digits.y_train, 1, 0.2, seed=0)[0]
    params = {"depth": 1, "conv1_filters": 8, "conv1_kernel_size": 3, "conv1_pool_size": 2, "dense_units": 32}
    metrics = train(params, split, digits.input_shape, digits.n_classes, epochs=2)
    assert metrics["epochs_run"] == 2 and 1 <= metrics["epochs_needed"] <= 2
    assert 0.0 <= metrics["val_accuracy"] <= 1.0

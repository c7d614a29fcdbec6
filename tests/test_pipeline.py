"""The whole path on digits with tiny budgets: search with pruning, MLflow nesting and
tags, the sealed test split, refit and test, and the logged model."""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pytest
from conftest import runs_of
from mlflow.tracking import MlflowClient

from pipeline.cli import run
from pipeline import names
from pipeline.core import run_study
from pipeline.space import load_space
from pipeline.study import PRUNE_AFTER, open_study


def test_main_nests_trials_under_one_parent_and_scores_the_test_split(settings, digits):
    metrics = run("main", settings.replace(n_trials=3, pruner="none"), data=digits)
    assert digits.test.opened
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    for key in ("best_val_accuracy", "test_precision_macro", "test_recall_macro", "test_f1_macro", "test_f1_0"):
        assert key in metrics

    study = optuna.load_study(study_name="test-study", storage=settings.storage)
    parent_id = study.user_attrs[names.PARENT_RUN]
    runs = runs_of("test-experiment")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert [p.info.run_id for p in parents] == [parent_id]
    assert len(children) == len(runs) - 1 == 3
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2]
    for child in children:
        number = int(child.data.tags["optuna.trial_number"])
        trial = study.trials[number]
        assert child.data.tags["optuna.study_name"] == "test-study"
        assert child.data.tags["optuna.trial_state"] == trial.state.name == "COMPLETE"
        assert child.info.status == "FINISHED"
        assert child.data.metrics["trial_value"] == pytest.approx(trial.value)
        assert child.data.params["depth"] == str(trial.user_attrs["params"]["depth"])
        history = MlflowClient().get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(len(history))) and len(history) >= 1
        assert {"train_accuracy", "train_loss", "val_loss", "epoch_seconds"} <= set(child.data.metrics)

    parent = MlflowClient().get_run(parent_id)
    assert parent.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent_id)}
    assert {"classification_report.txt", "confusion_matrix.png", "confusion_matrix_normalized.png"} <= artifacts

    # the Keras model takes raw uint8 pixels and predicts class probabilities
    models = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert {m.name for m in models} == {"keras_model", "model"}
    model = mlflow.pyfunc.load_model(next(m for m in models if m.name == "keras_model").model_uri)
    assert model.metadata.signature is not None
    x, y = digits.test.open()
    probabilities = np.asarray(model.predict(x[:50]))
    assert probabilities.shape == (50, 10)
    assert (probabilities.argmax(axis=1) == y[:50]).mean() > 0.5


def test_test_split_stays_sealed_until_the_refit(settings, digits):
    space = load_space(settings.search_space)
    study = open_study(settings, space)
    run_study("search", settings, digits, space)
    assert len(study.trials) == 3
    assert not digits.test.opened, "the search must not read the test split"
    run_study("refit", settings, digits, space)
    assert digits.test.opened


def write_space(tmp_path, learning_rates):
    path = tmp_path / "space.yaml"
    path.write_text(
        "depth: 1\n"
        "first_block: {filters: 16, kernel_size: 3, pool_size: 2}\n"
        "dense: {units: 64}\n"
        f"training: {{optimizer: adam, learning_rate: {learning_rates}, batch_size: 32}}\n"
    )
    return str(path)


@pytest.mark.parametrize("cv_folds", [1, 2])
def test_pruning_prunes_a_hopeless_trial(tmp_path, settings, digits, cv_folds):
    """Three good trials, then one that cannot learn (learning rate 1e-9): the median
    pruner stops it after its third epoch, Optuna says PRUNED and so does MLflow."""
    s = settings.replace(search_space=write_space(tmp_path, "[0.003, 0.000000001]"), epochs=4,
                         n_trials=4, cv_folds=cv_folds, pruner="median")
    space = load_space(s.search_space)
    study = open_study(s, space)
    for lr in (0.003, 0.003, 0.003, 1e-9):
        study.enqueue_trial({"learning_rate": lr})
    outcome = run_study("search", s, digits, space)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    pruned = study.trials[3]
    assert max(pruned.intermediate_values) == PRUNE_AFTER, "pruned after the third epoch of the first fold"
    child = MlflowClient().get_run(pruned.user_attrs["mlflow_run_id"])
    assert child.data.tags["optuna.trial_state"] == "PRUNED"
    assert child.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
    assert child.data.metrics["params_count"] > 0, "a pruned trial has its parameter count too"


def test_a_trial_is_never_pruned_at_its_last_epoch(tmp_path, settings, digits):
    """The hopeless trial again, with an epoch cap that ends where pruning starts: pruning
    there would save no training and throw a finished result away, so it completes."""
    s = settings.replace(search_space=write_space(tmp_path, "[0.003, 0.000000001]"), epochs=PRUNE_AFTER + 1,
                         n_trials=4, pruner="median")
    space = load_space(s.search_space)
    study = open_study(s, space)
    for lr in (0.003, 0.003, 0.003, 1e-9):
        study.enqueue_trial({"learning_rate": lr})
    run_study("search", s, digits, space)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert sorted(study.trials[3].intermediate_values) == list(range(PRUNE_AFTER + 1))
    assert study.trials[3].value < min(t.value for t in study.trials[:3])


def test_cross_validation_scores_each_trial_by_the_mean_over_folds(tmp_path, settings, digits):
    s = settings.replace(search_space=write_space(tmp_path, "0.003"), n_trials=1, cv_folds=3, pruner="none")
    space = load_space(s.search_space)
    study = open_study(s, space)
    run_study("search", s, digits, space)
    trial = study.trials[0]
    assert trial.state.name == "COMPLETE"
    history = MlflowClient().get_metric_history(trial.user_attrs["mlflow_run_id"], "val_accuracy")
    assert len(history) > s.epochs, "every fold logs its epochs"
    assert trial.user_attrs["epochs_run"] == len(history)


def test_a_fit_traces_once_keeps_no_traced_graph_and_its_input_is_not_autotuned(digits, monkeypatch):
    """The causes bench/README.md found: TensorFlow traced the train step twice when its first
    trace made the optimizer's and metrics' variables (about a third of a small trial's CPU);
    its gradient registry kept a `CustomGradient-<n>` entry (and with it every traced train step)
    per fit, so a worker's memory grew with every trial; an autotuned tf.data input made a fit
    return up to a minute after its last epoch. None is left: one trace a fit, no entry survives
    a fit, and autotuning is off."""
    import keras.src.backend.tensorflow.trainer as keras_tf_trainer
    from tensorflow.python.framework import ops

    from pipeline.train import Images, train, validation_splits

    traces, train_step = [], keras_tf_trainer.TensorFlowTrainer.train_step
    monkeypatch.setattr(keras_tf_trainer.TensorFlowTrainer, "train_step",
                        lambda self, data: traces.append(1) or train_step(self, data))
    registry = ops._gradient_registry._registry
    split = validation_splits(digits.x_train, digits.y_train, 1, 0.2, 42)[0]
    params = {"depth": 1, "conv1_filters": 4, "conv1_kernel_size": 3, "conv1_pool_size": 2, "dense_units": 8}
    counts = []
    for _ in range(2):
        train(params, split, digits.input_shape, digits.n_classes, epochs=1)
        counts.append(sum(name.startswith("CustomGradient-") for name in registry))
    assert len(traces) == 2, f"{len(traces)} traces of the train step in two fits"
    assert counts[0] == counts[1], "a fit left gradient functions (and their graphs) registered"
    batches = Images(digits.x_train[:64], digits.y_train[:64]).batches(range(64), 32, shuffle=True)
    assert batches.options().autotune.enabled is False

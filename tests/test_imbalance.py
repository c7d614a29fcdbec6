"""Imbalanced classes (issue 40): the class-balanced metrics each epoch (as scikit-learn
scores them), searching, pruning and ranking rungs by them, `class_weight=balanced` in the
loss, the start-of-run warning and the weakest classes in the summary."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score
from test_data import write_images

from pipeline.class_metrics import BalancedAccuracy, F1Macro
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.train import class_weights, train, validation_splits


PARAMS = {"depth": 1, "conv1_filters": 8, "conv1_kernel_size": 3, "conv1_pool_size": 2, "dense_units": 16}


def test_the_epoch_metrics_score_as_scikit_learn_does():
    """Accumulated over batches, a class absent from the labels but predicted included."""
    import warnings

    warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)  # class 4 never a label
    probabilities = rng.random((300, 5)).astype("float32")
    for metric, expected in ((F1Macro(5), f1_score(y, probabilities.argmax(1), average="macro")),
                             (BalancedAccuracy(5), balanced_accuracy_score(y, probabilities.argmax(1)))):
        for first in range(0, 300, 64):
            metric.update_state(y[first:first + 64], probabilities[first:first + 64])
        assert float(metric.result()) == pytest.approx(expected, abs=1e-6), metric.name
        metric.reset_state()
        assert float(metric.result()) == 0.0


def imbalanced(digits, keep_small=15):
    """Digits with classes 1-9 cut to `keep_small` training images each (class 0 keeps all)."""
    rows = np.concatenate([np.flatnonzero(digits.y_train == c)[: None if c == 0 else keep_small] for c in range(10)])
    return digits.x_train[rows], digits.y_train[rows]


def test_class_weight_balanced_weighs_the_loss_of_each_class(digits):
    x, y = imbalanced(digits)
    weights = class_weights("balanced", y, 10)
    counts = np.bincount(y, minlength=10)
    assert weights[0] == pytest.approx(len(y) / (10 * counts[0])) and weights[0] < 1
    assert weights[1] == pytest.approx(len(y) / 150) and weights[1] > 1
    assert class_weights("none", y, 10) is None
    split = validation_splits(x, y, 1, 0.2, 0)[0]
    params = dict(PARAMS, batch_size=32)

    def loss(weights):
        return train(params, split, x.shape[1:], 10, epochs=1, seed=0, class_weight=weights)["train_loss"]

    plain, ones = loss(None), loss({c: 1.0 for c in range(10)})
    assert ones == pytest.approx(plain, rel=1e-5), "weights of 1 are the plain loss"
    assert loss(class_weights("balanced", y[split.train_rows], 10)) != pytest.approx(plain, rel=1e-3)


def test_val_f1_macro_is_reported_each_epoch_and_prunes(digits):
    """The fit reports val_f1_macro and val_balanced_accuracy every epoch, and Optuna's pruning
    callback stops a trial on it: a pruner that prunes every value does, after epoch 1."""
    from pipeline.search import FoldPruning

    split = validation_splits(digits.x_train, digits.y_train, 1, 0.2, 0)[0]
    params = PARAMS
    metrics = train(params, split, digits.input_shape, 10, epochs=1, monitor="val_f1_macro")
    assert {"train_f1_macro", "val_f1_macro", "train_balanced_accuracy", "val_balanced_accuracy"} <= set(metrics)
    assert 0 < metrics["val_f1_macro"] <= 1 and 0 < metrics["val_balanced_accuracy"] <= 1
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        train(params, split, digits.input_shape, 10, epochs=3, monitor="val_f1_macro",
              callbacks=[FoldPruning(trial, "val_f1_macro")])
    assert list(trial.storage.get_trial(trial._trial_id).intermediate_values) == [0]


def test_a_search_on_val_f1_macro_ranks_its_rungs_by_it(settings, digits):
    """Successive halving promotes the rung-0 evaluation of higher val_f1_macro (seed.yaml's default,
    the control, goes up too: pipeline.budget.rungs); every trial's value is its best epoch's
    val_f1_macro, as its MLflow run logged it."""
    from pipeline import names
    from pipeline.cli import run

    s = settings.replace(metric="val_f1_macro", n_trials=3, rungs="1,2", eta=2)
    run("search", s, data=digits)
    study = optuna.load_study(study_name=s.study, storage=s.storage)
    rung0 = [t for t in study.trials if t.user_attrs.get(names.RUNG) == 0 and t.state.name == "COMPLETE"]
    promoted = {t.user_attrs[names.PROMOTED_FROM] for t in study.trials if names.PROMOTED_FROM in t.user_attrs}
    assert len(rung0) == 2 and max(rung0, key=lambda t: t.value).number in promoted
    import mlflow

    for t in (t for t in study.trials if t.state.name == "COMPLETE"):
        history = mlflow.MlflowClient().get_metric_history(t.user_attrs[names.MLFLOW_RUN_ID], "val_f1_macro")
        assert t.value == pytest.approx(max(m.value for m in history)), t.number


@pytest.mark.parametrize("changes, fragment", [
    ({"metric": "val_f1_macro", "direction": "minimize"}, "metric='val_f1_macro': is maximized: set direction=maximize"),
    ({"class_weight": "inverse"}, "class_weight='inverse': must be one of none, balanced"),
])
def test_bad_imbalance_settings_are_one_line_errors(changes, fragment):
    with pytest.raises(PipelineError) as error:
        Settings(**changes)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_an_imbalanced_folder_is_named_at_the_start_and_its_weakest_classes_at_the_end(tmp_path, settings, capsys):
    """3:1 training images: the start of the run says so and names the settings; with them
    set, the refit weighs its classes too, and the summary lists the three weakest by test F1."""
    import mlflow

    root = tmp_path / "animals"
    for name, n in (("ant", 9), ("bee", 3), ("cow", 4), ("dog", 4)):
        write_images(root / "train", classes=(name,), n=n)
        write_images(root / "test", classes=(name,), n=2)
    from pipeline.cli import run

    s = settings.replace(dataset=str(root), n_trials=1, epochs=1, metric="val_balanced_accuracy",
                         class_weight="balanced")
    metrics = run("main", s)
    out = capsys.readouterr().out
    assert ("classes imbalanced: 'ant' has 9 training images, 'bee' 3 (3.0:1); to weigh every class alike set "
            "metric=val_f1_macro or val_balanced_accuracy and class_weight=balanced "
            "(now metric=val_balanced_accuracy, class_weight=balanced)") in out, out
    f1 = sorted((metrics[f"test_f1_{c}"], c) for c in ("ant", "bee", "cow", "dog"))
    line = next(x for x in out.splitlines() if x.startswith("weakest classes by test F1: "))
    assert line == "weakest classes by test F1: " + ", ".join(f"{c} {v:.4f}" for v, c in f1[:3])
    parent = next(r for r in mlflow.search_runs(experiment_names=["test-experiment"], output_format="list")
                  if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["class_weight"] == "balanced" and "best_val_balanced_accuracy" in parent.data.metrics


def test_balanced_classes_get_no_imbalance_line(tmp_path, settings, capsys):
    from pipeline.cli import run

    write_images(tmp_path / "even", classes=("a", "b"), n=6)
    run("space", settings.replace(dataset=str(tmp_path / "even"), samples=1))
    assert "classes imbalanced" not in capsys.readouterr().out

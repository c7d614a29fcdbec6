"""What a user sees: dataset lineage on every run that trains or tests, the parent run's
name and description through main, resume and a second refit, system metrics on request,
progress through the search and the refit, and a console without warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import mlflow
import numpy as np
import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.cli import run
from pipeline.data import digest
from pipeline.space import load_space
from pipeline.study import open_study
from pipeline.tracking import DESCRIPTION, EXPERIMENT_KIND
from pipeline.train import validation_splits

# Python's default filters hide these four from a user (outside __main__); anything else would show.
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def inputs_of(run) -> dict:
    """{context: (name, digest, rows, classes)} of a run's dataset inputs."""
    found = {}
    for d in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        rows = json.loads(d.dataset.profile)["features_shape"][0]
        found[tags["mlflow.data.context"]] = (d.dataset.name, d.dataset.digest, rows, tags["classes"])
    return found


def test_every_run_that_trains_or_tests_names_its_data_and_system_metrics_come_on_request(settings, digits,
                                                                                          monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    s = settings.replace(n_trials=2, epochs=2, system_metrics=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("main", s, data=digits)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN)]
    assert shown == [], "a small main run emits no warning a user would see"

    client = MlflowClient()
    study = open_study(s, load_space(s.search_space))
    parent = client.get_run(study.user_attrs[names.PARENT_RUN])
    split = validation_splits(digits.x_train, digits.y_train, 1, s.val_fraction, s.seed)[0]
    x, y = digits.x_train, digits.y_train
    for trial in study.trials:
        got = inputs_of(client.get_run(trial.user_attrs[names.MLFLOW_RUN_ID]))
        assert got == {"training": ("digits", digest(x, y, split.train_rows), len(split.train_rows), "10"),
                       "validation": ("digits", digest(x, y, split.val_rows), len(split.val_rows), "10")}
    assert inputs_of(parent) == {"training": ("digits", digest(x, y), len(y), "10"),
                                 "test": ("digits", digest(*digits.test.open()), len(digits.test), "10")}
    source = parent.inputs.dataset_inputs[0].dataset.source
    assert "sklearn.datasets.load_digits" in source

    experiment = [parent.info.experiment_id]
    tested = client.search_runs(experiment, "dataset.name = 'digits' AND dataset.context = 'test'")
    assert [r.info.run_id for r in tested] == [parent.info.run_id], "runs can be filtered by their data"
    assert len(client.search_runs(experiment, "dataset.context = 'validation'")) == 2

    for run_id in (study.trials[0].user_attrs[names.MLFLOW_RUN_ID], parent.info.run_id):
        metrics = client.get_run(run_id).data.metrics
        assert metrics["system/cpu_utilization_percentage"] >= 0 and metrics["system/system_memory_usage_megabytes"] > 0


def test_a_digest_changes_with_any_pixel_label_or_row_choice(digits):
    x, y = digits.x_train.copy(), digits.y_train.copy()
    first = digest(x, y)
    x[-1, -1, -1, 0] ^= 1
    assert digest(x, y) != first
    x[-1, -1, -1, 0] ^= 1
    y[-1] = (y[-1] + 1) % 10
    assert digest(x, y) != first
    y[-1] = digits.y_train[-1]
    assert digest(x, y) == first and digest(x, y, np.arange(len(y) - 1)) != first


@pytest.mark.slow
def test_the_parent_run_is_named_after_the_study_and_describes_it_through_resume_and_refit(settings, digits,
                                                                                          capsys):
    s = settings.replace(n_trials=2, epochs=1)
    run("main", s, data=digits)
    client = MlflowClient()
    study = open_study(s, load_space(s.search_space))
    parent_id = study.user_attrs[names.PARENT_RUN]

    def described():
        parent = client.get_run(parent_id)
        assert parent.info.run_name == s.study
        return parent.data.tags[DESCRIPTION]

    text = described()
    best = study.best_trial
    assert f"### Study `{s.study}`" in text and "2 (2 COMPLETE); budget 2" in text
    assert f"#{best.number}: val_accuracy {best.value:.4f}" in text
    test_accuracy = client.get_run(parent_id).data.metrics["test_accuracy"]
    assert f"test_accuracy {test_accuracy:.4f}" in text and "registered model | test-study, version 1" in text
    resume = next(line for line in text.splitlines() if "python -m pipeline search" in line)
    assert resume.startswith(f"cd {os.getcwd()} && MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()} python -m pipeline")
    for option in ("--n-trials 2", "--epochs 1", f"--search-space {s.search_space}", f"--study-name {s.study}",
                   f"--storage {s.storage}", f"--experiment-name {s.experiment_name}"):
        assert f" {option}" in resume, "the exact command resumes the same study"
    assert f"MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()} mlflow models serve -m models:/test-study/1 " in text
    assert client.get_experiment(client.get_run(parent_id).info.experiment_id).tags[EXPERIMENT_KIND[0]] == \
        EXPERIMENT_KIND[1], "the UI opens the experiment on its training runs"

    run("search", s.replace(n_trials=3), data=digits)  # resume: one more trial
    text = described()
    assert "3 (3 COMPLETE); budget 3" in text and "--n-trials 3" in text and "version 1" in text

    run("refit", s.replace(n_trials=3), data=digits)  # a second refit: a new registered version
    text = described()
    assert "version 2" in text and "models:/test-study/2" in text
    out = capsys.readouterr().out
    epochs = int(client.get_run(parent_id).data.metrics["refit_epochs"])
    assert f"refit epoch {epochs}/{epochs}: " in out and "train_loss" in out, "the refit shows its epochs"
    history = client.get_metric_history(parent_id, "train_loss")
    assert len(history) == 2 * epochs == len({m.step for m in history}), \
        "each refit logs its epochs to the parent, the second after the first"


def test_the_console_of_a_main_run_has_progress_and_no_warning(tmp_path):
    """As a user runs it: no TensorFlow banner and no warning on stderr; a deadline bar, the
    refit's epochs and a summary. The space is the tutorial's with random translation, which
    every image-folder and CIFAR-10 space has (its gather by int64 indices once made oneDNN
    print an error line)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as in a user's shell
    space = tmp_path / "seed_translate.yaml"
    space.write_text((ROOT / "search_spaces/seed.yaml").read_text() + "augment: {translate: 1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "main", "--n-trials", "2", "--epochs", "1", "--timeout", "3600",
         "--storage", f"sqlite:///{tmp_path}/optuna.db", "--search-space", str(space)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "oneDNN" not in result.stderr and "warning" not in result.stderr.lower(), result.stderr
    assert "augment_translate = 1" in result.stdout, "the best trial's summary shows the key"
    assert "to the deadline" in result.stderr, "the bar counts down to the study's deadline"
    assert "refit epoch 1/1: " in result.stdout and "test_accuracy=" in result.stdout
    assert "#/experiments/1?workflowType=machine_learning" in result.stdout, "the UI link opens on the runs"

"""Shared fixtures: shrink the config instead of mocking anything.

Every test gets a real MLflow tracking store (SQLite) and a real Optuna storage (SQLite)
in its own temp dir; the digits data set is loaded once per session and handed out with
a fresh, sealed test split.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.config import Settings  # noqa: E402


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh MLflow store for this test, also seen by subprocesses."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID to os.environ; recording the variable
    # first makes the teardown remove it, so no later subprocess (`mlflow run`) inherits it.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment exports it to subprocesses


@pytest.fixture
def settings(tmp_path, tracking_uri) -> Settings:
    """A tiny configuration: 3 trials of 2 epochs on digits, in temp storages."""
    return Settings(
        dataset="digits",
        search_space=str(ROOT / "search_spaces" / "seed.yaml"),
        n_trials=3,
        epochs=2,
        storage=f"sqlite:///{tmp_path}/optuna.db",
        study_name="test-study",
        experiment_name="test-experiment",
    )


@pytest.fixture(scope="session")
def _digits():
    from pipeline.data import load_digits

    return load_digits(seed=42)


@pytest.fixture
def digits(_digits):
    """The digits data set with a fresh, unopened test split."""
    from pipeline.data import HeldOut

    return dataclasses.replace(_digits, test=HeldOut(_digits.test.x, _digits.test.y))


def runs_of(experiment_name: str):
    """All runs of an experiment as a list of mlflow Run objects."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], max_results=1000)

"""End to end as a user runs it: `mlflow run . --env-manager local` with tiny budgets.
The project run that `mlflow run` opens is the study's parent; trials nest under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient


@pytest.mark.drill
@pytest.mark.parametrize("env_manager", ["local", pytest.param("uv", marks=pytest.mark.slow)])
def test_mlflow_run(tmp_path, tracking_uri, env_manager):
    """`uv` builds an environment from conda.yaml's pip section (cached in ~/.mlflow/envs)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "MLFLOW_TRACKING_URI": tracking_uri}
    result = subprocess.run(
        [f"{bin_dir}/mlflow", "run", str(ROOT), "--env-manager", env_manager, "--experiment-name", "e2e",
         "-P", "n_trials=2", "-P", "epochs=1", "-P", f"storage=sqlite:///{tmp_path}/o.db"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_accuracy=" in result.stdout
    assert "oneDNN" not in result.stderr and "Warning" not in result.stderr, result.stderr[-3000:]

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "digits-seed", "named after the study, not mlflow run's made-up name"
    assert "registered model | digits-seed, version 1" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["mlflow.project.entryPoint"] == "main"  # the run `mlflow run` opened
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 == len(runs) - 1
    assert "test_accuracy" in parent.data.metrics and "best_val_accuracy" in parent.data.metrics
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    models = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert sorted(m.name for m in models) == ["keras_model", "model"]
    assert {m.source_run_id for m in models} == {parent.info.run_id}
    assert "optimization_history.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.drill
@pytest.mark.slow
@pytest.mark.fresh_store
def test_mlflow_run_workers_start_together_on_a_fresh_store(tmp_path, tracking_uri):
    """README "Storages and workers": `mlflow run . -e space` once makes the fresh MLflow store
    (workers creating it at once race in MLflow's own schema migration), then two
    `mlflow run . -e search` workers started together share one study and one parent run."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "MLFLOW_TRACKING_URI": tracking_uri}
    common = [f"{bin_dir}/mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "workers"]
    study = ["-P", f"storage=journal:///{tmp_path}/study.journal", "-P", "study_name=shared"]
    prepare = subprocess.run([*common, "-e", "space", "-P", "samples=1"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    workers = [subprocess.Popen([*common, "-e", "search", *study, "-P", "n_trials=3", "-P", "epochs=1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in results]

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("workers").experiment_id])
    studies = [r for r in runs if r.data.tags.get("pipeline.role") == "study"]
    assert len(studies) == 1
    trials = [r for r in runs if "optuna.trial_number" in r.data.tags]
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in trials)
    assert numbers == list(range(len(numbers))) and 3 <= len(numbers) <= 5

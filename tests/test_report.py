"""Results a person can read: a finished tiny study (digits, 3 trials of 2 epochs) has its
plots, trials table and reports on the parent run, learning curves on each trial run, a
registered model that answers with class names (through pyfunc and `mlflow models serve`),
and a terminal summary. Class names are words here, to show they travel from the dataset."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import ROOT, serve_and_ask
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import Settings
from pipeline.report import STUDY_PLOTS, study_plots, timeline_png, trials_table
from pipeline import names

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _digits):
    """`main` on a tiny study, once for this module: (settings, study, parent run, stdout)."""
    from pipeline.cli import run
    from pipeline.data import HeldOut

    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    data = dataclasses.replace(_digits, test=HeldOut(_digits.test.x, _digits.test.y), class_names=NAMES)
    settings = Settings(search_space=str(ROOT / "search_spaces" / "seed.yaml"), n_trials=3, epochs=2,
                        storage=f"sqlite:///{tmp}/optuna.db", study_name="report-study", experiment_name="report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # as conftest._in_tmp_path does for a test: ./mlruns is made there
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            metrics = run("main", settings, data=data)
        study = optuna.load_study(study_name="report-study", storage=settings.storage)
        parent = MlflowClient().get_run(study.user_attrs[names.PARENT_RUN])
        yield dict(settings=settings, study=study, parent=parent, stdout=out.getvalue(), stderr=err.getvalue(), metrics=metrics,
                   uri=uri, data=data, tmp=tmp)
        mlflow.set_tracking_uri(None)


@pytest.fixture
def store(finished, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", finished["uri"])
    mlflow.set_tracking_uri(finished["uri"])
    yield finished
    mlflow.set_tracking_uri(None)


def test_parent_run_has_plots_tables_and_reports(store):
    client, run_id = MlflowClient(), store["parent"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    for name in STUDY_PLOTS:
        assert {f"{name}.html", f"{name}.png"} <= artifacts, name
    assert {"trials.csv", "classification_report.txt", "classification_report.json",
            "confusion_matrix.png", "confusion_matrix_normalized.png"} <= artifacts

    folder = Path(client.download_artifacts(run_id, "", dst_path=str(store["tmp"] / "artifacts")))
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) >= 300, png.name
    for name in STUDY_PLOTS:
        html = (folder / f"{name}.html").read_text()
        assert "plotly" in html and "<html>" in html, name

    with open(folder / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    study = store["study"]
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials] == [0, 1, 2]
    for row, trial in zip(rows, study.trials):
        assert row["state"] == trial.state.name
        assert float(row["value"]) == pytest.approx(trial.value)
        assert float(row["duration"]) > 0
        assert row["params_depth"] == str(trial.params["depth"])
        assert row["mlflow_run_id"] == trial.user_attrs["mlflow_run_id"]

    report = json.loads((folder / "classification_report.json").read_text())
    assert set(NAMES) <= set(report)
    assert "seven" in (folder / "classification_report.txt").read_text()
    assert "test_f1_seven" in store["parent"].data.metrics


def test_each_trial_run_has_learning_curves_params_count_and_epoch_seconds(store):
    client = MlflowClient()
    for trial in store["study"].trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        metrics = client.get_run(run_id).data.metrics
        assert metrics["params_count"] == trial.user_attrs["params_count"] > 0
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
            history = client.get_metric_history(run_id, key)
            assert [m.step for m in history] == list(range(trial.user_attrs["epochs_run"])), key


def test_registered_model_predicts_class_names(store):
    name = store["settings"].model_name
    assert name == "report-study"
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == store["parent"].info.run_id
    assert store["parent"].data.tags["registered_model"] == f"{name}/1"

    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    x, y = store["data"].test.x, store["data"].test.y
    predictions = model.predict(x[:60])
    assert list(predictions.columns[:2]) == ["class", "probability"]
    assert set(predictions["class"]) <= set(NAMES)
    assert (predictions["class"] == [NAMES[i] for i in y[:60]]).mean() > 0.5
    probabilities = predictions[[f"p_{n}" for n in NAMES]].to_numpy()
    assert probabilities.sum(axis=1) == pytest.approx(1.0, abs=1e-4)
    assert predictions["probability"].to_numpy() == pytest.approx(probabilities.max(axis=1))

    # each refit registers one more version
    from pipeline.cli import run

    with contextlib.redirect_stdout(io.StringIO()):
        run("refit", store["settings"], data=store["data"])
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert MlflowClient().get_run(store["parent"].info.run_id).data.tags["registered_model"] == f"{name}/2"


def test_progress_bar_counts_trials_against_the_budget_and_shows_the_best(store):
    study = store["study"]
    bar = [line for line in store["stderr"].split("\r") if line.startswith("study report-study:")]
    assert "study report-study:   0%" in bar[0] and " 0/3 " in bar[0]
    assert any(" 1/3 " in line for line in bar)
    assert " 3/3 " in bar[-1] and f"best val_accuracy={study.best_value:.4f} (trial {study.best_trial.number})" in bar[-1]


def test_summary_names_states_best_trial_run_and_commands(store):
    out, study = store["stdout"], store["study"]
    assert "study 'report-study': 3 trials (3 COMPLETE), budget 3" in out
    assert f"best trial: #{study.best_trial.number} val_accuracy={study.best_value:.4f}" in out
    assert f"  depth = {study.best_trial.params['depth']}" in out
    assert f"test_accuracy={store['metrics']['test_accuracy']:.4f}" in out
    assert f"MLflow parent run: {store['parent'].info.run_id}" in out
    assert f"mlflow ui --backend-store-uri {store['uri']}" in out
    assert f"optuna-dashboard {store['settings'].storage}" in out
    assert "mlflow models serve -m models:/report-study/1 --env-manager local" in out


@pytest.mark.drill
@pytest.mark.slow
def test_mlflow_models_serve_answers_with_class_names(store):
    x, y = store["data"].test.x[:5], store["data"].test.y[:5]
    answer = serve_and_ask("models:/report-study/1", {"inputs": x.tolist()}, store["uri"])
    predictions = answer["predictions"]
    assert len(predictions) == 5
    assert all(p["class"] in NAMES and 0 < p["probability"] <= 1 for p in predictions)
    assert sum(p["class"] == NAMES[i] for p, i in zip(predictions, y)) >= 3


def _study_with(values: list[float], report: bool) -> optuna.Study:
    study = optuna.create_study(direction="maximize")

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if report:
            trial.report(x, 0)
        return values[trial.number]

    study.optimize(objective, n_trials=len(values))
    return study


def test_plots_a_study_cannot_support_are_skipped_with_a_note(tmp_path, caplog):
    import matplotlib

    style = dict(matplotlib.rcParams)
    one = _study_with([0.5], report=False)
    skipped = study_plots(one, tmp_path)
    assert set(skipped) == {"param_importances", "intermediate_values"}
    assert "needs at least 2 complete trials" in skipped["param_importances"]
    assert "param_importances plot skipped" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "optimization_history.html", "optimization_history.png", "parallel_coordinate.html", "parallel_coordinate.png"]

    (tmp_path / "empty").mkdir()
    assert set(study_plots(optuna.create_study(), tmp_path / "empty")) == set(STUDY_PLOTS)
    assert list((tmp_path / "empty").iterdir()) == []

    (tmp_path / "all").mkdir()
    assert study_plots(_study_with([0.1, 0.9, 0.4], report=True), tmp_path / "all") == {}
    assert len(list((tmp_path / "all").iterdir())) == 2 * len(STUDY_PLOTS)
    assert dict(matplotlib.rcParams) == style, "Optuna's ggplot style must not leak into later figures"


def test_registered_model_name_defaults_to_the_study_and_refuses_what_the_registry_refuses():
    from pipeline.errors import PipelineError

    assert Settings(study_name="cifar/wide:2").model_name == "cifar-wide-2"
    assert Settings(study_name="s", registered_model_name="my-cnn").model_name == "my-cnn"
    with pytest.raises(PipelineError, match="registered_model_name='a/b': must not contain"):
        Settings(registered_model_name="a/b")


def test_trials_table_of_an_empty_study_and_of_a_running_trial(tmp_path):
    study = optuna.create_study()
    assert trials_table(study, tmp_path / "empty.csv").read_text().strip() == "number,state,value,duration"
    done = study.ask()
    done.suggest_float("x", 0, 1)
    study.tell(done, 0.3)
    study.ask().suggest_float("x", 0, 1)  # another worker's trial, still running
    with open(trials_table(study, tmp_path / "two.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["state"], r["value"], r["duration"] == "") for r in rows] == [("COMPLETE", "0.3", False), ("RUNNING", "", True)]


def test_timeline_of_a_budgeted_run_draws_its_phases_and_evaluations_from_its_records(tmp_path, tracking_uri):
    """Records as a budgeted `main` leaves them: the parent's plan metrics, its refit's epochs and
    timings, and a study of evaluations at two rungs, one pruned; a run without a plan has none."""
    import time

    from pipeline.tracking import log_metrics

    client = MlflowClient()
    experiment = client.create_experiment("timeline")
    run_id, started = client.create_run(experiment).info.run_id, time.time()
    log_metrics(client, run_id, {"plan_budget_seconds": 60, "plan_budget_end": started + 58,
                                 "plan_search_until": started + 20})
    study = optuna.create_study(direction="maximize")

    def objective(trial):
        trial.set_user_attr(names.RUNG, trial.number // 3)
        if trial.number == 1:
            raise optuna.TrialPruned()
        return trial.suggest_float("x", 0, 1)

    study.optimize(objective, n_trials=5)
    for epoch in range(2):
        client.log_metric(run_id, "train_loss", 1.0 / (epoch + 1), step=epoch)
    log_metrics(client, run_id, {"refit_seconds": 0.2, "test_seconds": 0.1})
    client.set_terminated(run_id)

    png = timeline_png(study, client, run_id, tmp_path / "timeline.png")
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 800
    assert timeline_png(study, client, client.create_run(experiment).info.run_id, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()

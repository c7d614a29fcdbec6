"""Refit the best trial on the whole train split, then score it once on the test split.

The best trial (in a multi-objective study: the Pareto trial the `select` rule picks, see
pipeline/pareto.py) is refit for the epochs it actually needed (its best epoch).
Only here is the held-out test split opened. Results go to the study's parent run:
`best_<metric>`, `test_accuracy`, `test_{precision,recall,f1}_macro`, per-class scores,
the classification report (text and JSON), confusion matrices (PNG) and the model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    classification_report,
    precision_recall_fscore_support,
)

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.pareto import select_trial  # noqa: E402
from pipeline.train import fit_full  # noqa: E402


def best_trial(study: optuna.Study, settings) -> optuna.trial.FrozenTrial:
    if settings.multi_objective:
        return select_trial(study, settings)
    try:
        return study.best_trial
    except ValueError:
        raise PipelineError(f"study {study.study_name!r} has no complete trial to refit") from None


def score(y_true, y_pred, class_names: list[str]) -> tuple[dict, dict, str]:
    """Test metrics, the report as a dict and as text."""
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    metrics = {
        "test_accuracy": accuracy_score(y_true, y_pred),
        "test_precision_macro": precision,
        "test_recall_macro": recall,
        "test_f1_macro": f1,
    }
    labels = list(range(len(class_names)))
    kwargs = dict(labels=labels, target_names=class_names, zero_division=0, digits=4)
    report = classification_report(y_true, y_pred, output_dict=True, **kwargs)
    for name in class_names:
        for key in ("precision", "recall", "f1-score"):
            metrics[f"test_{key.split('-')[0]}_{_safe(name)}"] = report[name][key]
    return metrics, report, classification_report(y_true, y_pred, **kwargs)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def confusion_pngs(y_true, y_pred, class_names: list[str], folder: Path) -> list[Path]:
    """Confusion matrix as counts and row-normalised, labelled with class names."""
    paths = []
    for normalize, name in ((None, "confusion_matrix.png"), ("true", "confusion_matrix_normalized.png")):
        size = max(5, 0.6 * len(class_names) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, labels=range(len(class_names)), display_labels=class_names, normalize=normalize,
            values_format=".2f" if normalize else "d", ax=ax, colorbar=False, xticks_rotation=45,
        )
        ax.set_title("Test confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        paths.append(folder / name)
    return paths


def refit_and_test(study: optuna.Study, data, settings, tracker) -> dict:
    """Refit the best configuration, open the test split once, log everything to the parent."""
    best = best_trial(study, settings)
    params = best.user_attrs["params"]
    epochs = int(best.user_attrs["epochs_needed"])
    print(f"refit: trial {best.number} ({settings.metric}={best.values[0]:.4f}) for {epochs} epoch(s) "
          f"on all {len(data.y_train)} training images")
    model = fit_full(params, data.x_train, data.y_train, data.input_shape, data.n_classes, epochs=epochs, seed=settings.seed)

    x_test, y_test = data.test.open()
    probabilities = model.predict(x_test, verbose=0, batch_size=256)
    y_pred = probabilities.argmax(axis=1)
    metrics, report, report_text = score(y_test, y_pred, data.class_names)
    metrics[f"best_{settings.metric}"] = best.values[0]
    metrics["refit_epochs"] = epochs

    client, run_id = tracker.client, tracker.parent_run_id
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "best_trial_number", str(best.number))
    if settings.multi_objective:
        client.set_tag(run_id, "select", settings.select or "most accurate")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "classification_report.txt").write_text(report_text)
        (folder / "classification_report.json").write_text(json.dumps(report, indent=2))
        (folder / "best_params.json").write_text(json.dumps(params, indent=2))
        confusion_pngs(y_test, y_pred, data.class_names, folder)
        for path in sorted(folder.iterdir()):
            client.log_artifact(run_id, str(path))
    log_model(model, x_test[:4], data.class_names, run_id)
    return metrics


def log_model(model, example: np.ndarray, class_names: list[str], run_id: str) -> None:
    """Log the Keras model with its signature. `input_example=` crashes in mlflow 3.17-3.18
    (mlflow issue 16183), so the example travels as a JSON artifact beside the model."""
    signature = infer_signature(example, model.predict(example, verbose=0))
    with mlflow.start_run(run_id=run_id):
        mlflow.keras.log_model(model, name="model", signature=signature)
        mlflow.log_dict({"inputs": example.tolist()}, "model_input_example.json")
        mlflow.log_dict({"class_names": class_names}, "class_names.json")

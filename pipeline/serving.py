"""The refit model as MLflow models: a Keras-flavor model, and a registered pyfunc that
answers with class names.

`ClassNameModel` wraps the saved Keras model: it takes a raw image array (N, H, W, C)
of pixel values 0-255 and returns one row per image with `class` (the class name),
`probability` (of that class) and one `p_<class>` column per class. The pyfunc is
registered in the MLflow model registry, one version per refit, so

    mlflow models serve -m models:/<registered_model_name>/<version> --env-manager local
    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \
         -d '{"inputs": [[[[0], ...]]]}'      # -> {"predictions": [{"class": "3", ...}]}

answers over REST. The example input travels as `model_input_example.json` beside the
models: `log_model(..., input_example=...)` crashes for Keras in mlflow 3.17 (mlflow
issue 16183), so the models are logged with an explicit signature instead.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

PACKAGE_DIR = Path(__file__).resolve().parent
# What serving the pyfunc needs; pinned to the installed versions so no requirement
# inference (a slow subprocess that loads TensorFlow) runs at logging time.
SERVING_PACKAGES = ("mlflow", "keras", "tensorflow-cpu", "numpy", "pandas", "PyYAML")


def probability_column(name: str) -> str:
    return f"p_{name}"


def predictions_frame(probabilities: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Class probabilities -> one row per image: `class`, `probability`, `p_<class>`..."""
    best = probabilities.argmax(axis=1)
    frame = pd.DataFrame({
        "class": [class_names[i] for i in best],
        "probability": probabilities[np.arange(len(best)), best].astype("float64"),
    })
    for i, name in enumerate(class_names):
        frame[probability_column(name)] = probabilities[:, i].astype("float64")
    return frame


class ClassNameModel(mlflow.pyfunc.PythonModel):
    """Pyfunc around the Keras model: raw pixels in, class names and probabilities out."""

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)

    def load_context(self, context):
        import keras

        import pipeline.model  # noqa: F401  registers the custom layers (Cutout) the saved model may hold

        self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False)

    def predict(self, context, model_input, params=None):
        pixels = np.asarray(model_input, dtype="uint8")  # the signature already checked the dtype
        return predictions_frame(self.model.predict(pixels, verbose=0), self.class_names)


def _pinned(packages) -> list[str]:
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def log_models(model, example: np.ndarray, class_names: list[str], run_id: str, registered_name: str):
    """Log the Keras model and the class-name pyfunc on `run_id`; register the pyfunc.

    Returns the pyfunc's `ModelInfo` (its `registered_model_version` is the new version).
    """
    example = np.asarray(example, dtype="uint8")
    probabilities = model.predict(example, verbose=0)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        mlflow.keras.log_model(model, name="keras_model", signature=infer_signature(example, probabilities),
                               pip_requirements=_pinned(SERVING_PACKAGES))
        keras_file = Path(tmp) / "model.keras"
        model.save(keras_file)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ClassNameModel(class_names),
            artifacts={"keras_model": str(keras_file)},
            code_paths=[str(PACKAGE_DIR)],
            signature=infer_signature(example, predictions_frame(probabilities, class_names)),
            pip_requirements=_pinned(SERVING_PACKAGES),
            registered_model_name=registered_name,
        )
        mlflow.log_dict({"inputs": example.tolist()}, "model_input_example.json")
        mlflow.log_dict({"class_names": list(class_names)}, "class_names.json")
    return info

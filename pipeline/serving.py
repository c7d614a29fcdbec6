"""The refit model as MLflow models: a Keras-flavor model, and a registered pyfunc that
answers with class names.

`ClassNameModel` wraps the saved Keras model: it takes a raw image array (N, H, W, C)
of pixel values 0-255 and returns one row per image with `class` (the class name),
`probability` (of that class) and one `p_<class>` column per class. The pyfunc is
registered in the MLflow model registry, one version per refit, so

    mlflow models serve -m models:/<registered_model_name>/<version> --env-manager local
    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \
         -d '{"inputs": [[[[0], ...]]]}'      # -> {"predictions": [{"class": "3", ...}]}

answers over REST. The pyfunc is logged as a "model from code" (pipeline/served_model.py,
no pickled object) with its input example; the Keras model is logged with an explicit
signature only, since `mlflow.keras.log_model(..., input_example=...)` crashes in mlflow 3.17
(mlflow issue 16183).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

PACKAGE_DIR = Path(__file__).resolve().parent
# What serving the pyfunc needs, with the packages of the Keras backend that trained; pinned
# to the installed versions so no requirement inference (a slow subprocess) runs at logging.
SERVING_PACKAGES = ("mlflow", "keras", "numpy", "pandas", "PyYAML")
BACKEND_PACKAGES = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "jax": ("jax", "jaxlib"), "torch": ("torch",)}


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
    """Pyfunc around the Keras model: raw pixels in, class names and probabilities out. Its
    artifacts: the saved Keras model and `class_names.json`."""

    def load_context(self, context):
        saved = json.loads(Path(context.artifacts["class_names"]).read_text())
        _serve_on(saved.get("keras_backend"))
        import keras

        import pipeline.model  # noqa: F401  registers the custom layers (Cutout) the saved model may hold

        self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False)
        self.class_names = saved["class_names"]

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        # An ndarray hint: MLflow validates the input against the logged signature (uint8
        # pixels of the trained shape) and infers no schema from the hint itself.
        pixels = np.asarray(model_input, dtype="uint8")
        return predictions_frame(self.model.predict(pixels, verbose=0), self.class_names)


def _serve_on(trained: str | None) -> None:
    """Load on the backend that trained when KERAS_BACKEND is unset and that backend is
    installed (a JAX-only environment has no TensorFlow, Keras' default); a saved model
    loads on any backend, so where it is not installed Keras' own default serves it."""
    if trained and "KERAS_BACKEND" not in os.environ and "keras" not in sys.modules \
            and importlib.util.find_spec(trained) is not None:
        os.environ["KERAS_BACKEND"] = trained


def requirements(backend: str) -> list[str]:
    """Pinned pip requirements of the served model trained on `backend`."""
    return _pinned((*SERVING_PACKAGES, *BACKEND_PACKAGES[backend]))


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
    import keras

    example = np.asarray(example, dtype="uint8")
    probabilities = model.predict(example, verbose=0)
    backend = keras.backend.backend()
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        mlflow.keras.log_model(model, name="keras_model", signature=infer_signature(example, probabilities),
                               pip_requirements=requirements(backend))
        keras_file, names_file = Path(tmp) / "model.keras", Path(tmp) / "class_names.json"
        model.save(keras_file)
        names_file.write_text(json.dumps({"class_names": list(class_names), "keras_backend": backend}))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "served_model.py"),
            artifacts={"keras_model": str(keras_file), "class_names": str(names_file)},
            code_paths=[str(PACKAGE_DIR)],
            signature=infer_signature(example, predictions_frame(probabilities, class_names)),
            input_example=example,
            pip_requirements=requirements(backend),
            registered_model_name=registered_name,
        )
        mlflow.log_dict({"inputs": example.tolist()}, "model_input_example.json")
        mlflow.log_artifact(str(names_file))
    return info

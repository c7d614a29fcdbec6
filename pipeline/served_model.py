"""The registered pyfunc as MLflow "model from code": MLflow runs this file when it loads
the model (pipeline/serving.py logs it; the package travels with the model as code)."""

import mlflow

from pipeline.serving import ClassNameModel

mlflow.models.set_model(ClassNameModel())

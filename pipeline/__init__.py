"""Hyperparameter search for Keras CNNs with Optuna and MLflow.

Run `python -m pipeline --help` or `mlflow run .`; see README.md.
"""

"""Refit the best trial on the whole train split, then score it once on the test split.

The whole train split is every training row: an image folder's train/ and its validation
folder (validation/, val/ or valid/) together; a `class_weight` weighs the refit's loss as
it weighed the trials'.

The best trial (in a multi-objective study: the Pareto trial the `select` rule picks, see
pipeline/best.py) is refit for the epochs it actually needed (its best epoch), or for
`refit_epochs` (a learning-rate schedule then spans those epochs), printing a
line per epoch and logging its `train_*` metrics per epoch to the study's parent run.
Only here is the held-out test split opened. Results go to the parent run: the training
and test data as MLflow datasets, the wall seconds of the fit (`refit_seconds`), of
predicting and scoring the test split (`test_seconds`) and of logging the report and
models (`logging_seconds`), `best_<metric>`, `test_accuracy`,
`test_{precision,recall,f1}_macro`, the served model's `latency_ms` (milliseconds an image,
its test-time augmentation `tta` included), per-class scores, the classification report (text and
JSON) and confusion matrices (PNG, pipeline.report), and the models (pipeline.serving): the
Keras model, and a pyfunc that answers with class names, registered as
`registered_model_name` (a new version per refit).
"""

from __future__ import annotations

import time

import optuna
from sklearn.metrics import accuracy_score, classification_report, precision_recall_fscore_support

from pipeline import names
from pipeline.best import best_trial
from pipeline.config import Settings
from pipeline.model import (LATENCY_IMAGES, LATENCY_REPEATS, for_serving, inference_batch, latency_ms, tta_views,
                            with_tta)
from pipeline.report import log_test_report
from pipeline.serving import log_models
from pipeline.tracking import Tracker, log_datasets, log_metrics
from pipeline.train import EpochLines, class_weights, fit_full


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


def forward_images(params: dict, test_rows: int) -> int:
    """Images `refit_and_test` passes forward through the network after the fit: the test split's
    and `latency_ms`'s warm-up and timed batches, each once per test-time view (what a time
    budget keeps room for, pipeline.budget.plan.reserve)."""
    views = max(1, len(tta_views(params.get("tta", "none"))))
    return views * (test_rows + (1 + LATENCY_REPEATS) * min(LATENCY_IMAGES, test_rows))


def refit_and_test(study: optuna.Study, data, settings: Settings, tracker: Tracker, *, epochs: int | None = None,
                   stop_at: float | None = None, params: dict | None = None) -> dict:
    """Refit the best configuration (or `params`, trained without a search: `search_share=0`), open
    the test split once, log everything to the parent. `epochs`: the refit's (a time budget's
    plan); default `refit_epochs`, else the epochs the best trial needed. `stop_at`: epoch seconds
    at which the fit ends regardless (a budget's reserve)."""
    best = None if params else best_trial(study, settings)
    params = params or best.user_attrs[names.PARAMS]
    epochs = epochs or settings.refit_epochs or int(best.user_attrs[names.EPOCHS_NEEDED])
    client, run_id = tracker.client, tracker.parent_run_id
    what = f"trial {best.number} ({settings.metric}={best.values[0]:.4f})" if best else "the default, unsearched,"
    folders = " + ".join(data.folders[k] for k in ("training", "validation") if k in data.folders)
    print(f"refit: {what} for {epochs} epoch(s) on all {len(data.y_train)} training images"
          + (f" ({folders})" if folders else ""), flush=True)
    # the parent's epochs continue across refits, so a second refit's curve follows the first's
    offset = len(client.get_metric_history(run_id, "train_loss"))
    callbacks = [tracker.epoch_logger(run_id, offset), EpochLines("refit", epochs)]
    start = time.perf_counter()
    with tracker.system_metrics(run_id, resume=True):
        model = fit_full(params, data.x_train, data.y_train, data.input_shape, data.n_classes, epochs=epochs,
                         seed=settings.seed, callbacks=callbacks, stop_at=stop_at,
                         class_weight=class_weights(settings.class_weight, data.y_train, data.n_classes))
    model = with_tta(for_serving(model), params.get("tta", "none"))  # what is scored is what is served
    tracker.flush(run_id)
    fitted = time.perf_counter()

    x_test, y_test = data.test.open()
    log_datasets(client, run_id, [(data.lineage(data.x_train, data.y_train), "training"),
                                  (data.lineage(x_test, y_test), "test")])
    probabilities = model.predict(x_test, verbose=0, batch_size=inference_batch(data.input_shape))
    y_pred = probabilities.argmax(axis=1)
    metrics, report, report_text = score(y_test, y_pred, data.class_names)
    if best:
        metrics[f"best_{settings.metric}"] = best.values[0]
    metrics["refit_epochs"] = epochs
    tested = time.perf_counter()
    metrics.update(refit_seconds=fitted - start, test_seconds=tested - fitted)
    metrics[names.LATENCY_MS] = latency_ms(model, x_test[:LATENCY_IMAGES])

    log_metrics(client, run_id, metrics)
    client.set_tag(run_id, "best_trial_number", str(best.number) if best else "none (search_share=0)")
    if settings.multi_objective:
        client.set_tag(run_id, "select", settings.select or "most accurate")
    log_test_report(y_test, y_pred, data.class_names, report, report_text, params, client, run_id)
    info = log_models(model, x_test[:4], data.class_names, run_id, settings.model_name)
    client.set_tag(run_id, "registered_model", f"{settings.model_name}/{info.registered_model_version}")
    metrics["logging_seconds"] = time.perf_counter() - tested
    log_metrics(client, run_id, {"logging_seconds": metrics["logging_seconds"]})
    return metrics

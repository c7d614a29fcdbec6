"""The published models as baselines: train each with the pipeline's own `train` on the
search's hold-out validation split and epoch cap, then score it on the test split.

    python -m pipeline baselines --dataset digits --epochs 5 [--only toy_tuned,vgg4]

The configurations come from `baselines` (default search_spaces/baselines.yaml), each
validated against the space its document names (a file may hold several; pipeline.warm_start).
One MLflow parent run (`pipeline.role=baselines`) holds one run per baseline tagged
`baseline=<name>` and `search_space` with its per-epoch metrics, the best epoch's
`train_*`/`val_*` metrics, `test_*` scores (through its test-time views, `tta`),
`params_count` and `seconds`; the parent gets the table as `baselines.csv`. Unlike a search,
this command exists to open the test split.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path

from pipeline.config import Settings
from pipeline.model import inference_batch, with_tta
from pipeline.refit import score
from pipeline.tracking import Tracker, log_datasets, log_metrics
from pipeline.train import KeepModel, class_weights, train, validation_splits
from pipeline.warm_start import load_groups

COLUMNS = ("name", "parameters", "val_accuracy", "test_accuracy", "seconds")


def train_and_test(params: dict, split, data, x_test, y_test, settings: Settings, callbacks) -> dict:
    """Best-epoch metrics of one baseline, its test scores, parameter count and seconds."""
    keep = KeepModel()
    start = time.perf_counter()
    metrics = train(params, split, data.input_shape, data.n_classes, epochs=settings.epochs, monitor=settings.metric,
                    direction=settings.direction, patience=settings.patience, callbacks=[*callbacks, keep],
                    seed=settings.seed,
                    class_weight=class_weights(settings.class_weight, data.y_train[split.train_rows], data.n_classes))
    metrics["seconds"] = time.perf_counter() - start
    model = with_tta(keep.model, params.get("tta", "none"))  # scored with its test-time views, as a refit is
    y_pred = model.predict(x_test, verbose=0, batch_size=inference_batch(x_test.shape[1:])).argmax(axis=1)
    metrics.update(score(y_test, y_pred, data.class_names)[0])
    return metrics


def table(rows: list[dict]) -> str:
    lines = [f"{'name':<18} {'parameters':>11} {'val_accuracy':>13} {'test_accuracy':>14} {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<18} {r['parameters']:>11,} {r['val_accuracy']:>13.4f} "
                     f"{r['test_accuracy']:>14.4f} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def run_baselines(settings: Settings, data, device: str = "") -> list[dict]:
    """Train and test every chosen baseline; returns the table's rows."""
    groups = load_groups(settings.baselines, only=settings.only_names)
    configs = {name: (space, params) for space, chosen in groups for name, params in chosen.items()}
    split = validation_splits(data.x_train, data.y_train, 1, settings.val_fraction, settings.seed, data.val_rows)[0]
    tracker = Tracker(settings, run_name=f"baselines-{data.name}", device=device)
    client, parent = tracker.client, tracker.parent_run_id
    for k, v in {"pipeline.role": "baselines", "dataset": settings.dataset, "baselines": settings.baselines,
                 "search_space": ",".join(dict.fromkeys(space.path for space, _ in groups))}.items():
        client.set_tag(parent, k, v)
    for k, v in {"epochs": settings.epochs, "seed": settings.seed, "val_fraction": settings.val_fraction,
                 "patience": settings.patience}.items():
        client.log_param(parent, k, v)
    print(f"baselines: {', '.join(configs)} on {data.name}, {len(split.train_rows)} train / {len(split.val_rows)} "
          f"validation images, up to {settings.epochs} epoch(s) each")
    x_test, y_test = data.test.open()
    inputs = [(data.lineage(data.x_train, data.y_train, split.train_rows), "training"),
              (data.lineage(data.x_train, data.y_train, split.val_rows), "validation"),
              (data.lineage(x_test, y_test), "test")]
    rows, status = [], "FAILED"
    try:
        for name, (space, params) in configs.items():
            with tracker.child_run(name, params, baseline=name, search_space=space.path) as run_id:
                log_datasets(client, run_id, inputs)
                metrics = train_and_test(params, split, data, x_test, y_test, settings,
                                         [tracker.epoch_logger(run_id)])
                log_metrics(client, run_id, metrics)
            rows.append({"name": name, "parameters": metrics["params_count"], "val_accuracy": metrics["val_accuracy"],
                         "test_accuracy": metrics["test_accuracy"], "seconds": metrics["seconds"]})
            print(f"{name}: val_accuracy={metrics['val_accuracy']:.4f} test_accuracy={metrics['test_accuracy']:.4f} "
                  f"({metrics['seconds']:.0f} s)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "baselines.csv"
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            client.log_artifact(parent, str(path))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
    print("\n" + table(rows))
    return rows

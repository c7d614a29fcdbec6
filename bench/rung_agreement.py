"""Do short evaluations rank configurations as long ones do? The premise of successive halving,
measured: N configurations sampled from a space, each trained as a complete run (its schedule
spanning its epochs) at every rung given, on the search's own validation split; then Spearman's
rank correlation and the top-3 overlap between each rung and the last.

    python bench/rung_agreement.py --dataset ../shared/data/cifar10-sample --rungs 1,3,9 --configs 12
    python bench/rung_agreement.py --dataset digits --search-space search_spaces/seed.yaml --rungs 1,5 --configs 6

Options: `--search-space` (cifar10.yaml), `--seed`, `--rows N` (train on the first N training
rows of the split only: a cheaper look), `--csv FILE` (one row per configuration and rung).
Prints one line per configuration (its params and a score per rung), then
`configs rungs spearman_<r>_<last> top3_overlap_<r>_<last> seconds`.
"""

from __future__ import annotations

import argparse
import csv
import time

from common import ROOT, result_line

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from pipeline.data import load_dataset  # noqa: E402
from pipeline.space import load_space  # noqa: E402
from pipeline.train import Split, train, validation_splits  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--search-space", default=str(ROOT / "search_spaces" / "cifar10.yaml"))
    parser.add_argument("--rungs", default="1,3,9")
    parser.add_argument("--configs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--csv", default="")
    args = parser.parse_args()
    rungs = [int(r) for r in args.rungs.split(",")]
    data = load_dataset(args.dataset, args.seed, 0)
    space = load_space(args.search_space)
    split = validation_splits(data.x_train, data.y_train, 1, 0.2, args.seed)[0]
    if args.rows:
        split = Split(split.images, split.train_rows[: args.rows], split.val_rows)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    configs = [space.sample(study.ask()) for _ in range(args.configs)]
    scores = np.zeros((len(configs), len(rungs)))
    start = time.perf_counter()
    rows = []
    for i, params in enumerate(configs):
        varying = {k: v for k, v in params.items() if k in study.trials[i].params}
        for j, epochs in enumerate(rungs):
            metrics = train(params, split, data.input_shape, data.n_classes, epochs=epochs, patience=epochs,
                            seed=args.seed + i)
            scores[i, j] = metrics["val_accuracy"]
            rows.append({"config": i, "epochs": epochs, "val_accuracy": scores[i, j], **varying})
        print(f"config {i}: {varying} " + " ".join(f"{e}ep={s:.4f}" for e, s in zip(rungs, scores[i])), flush=True)
    result = {"configs": len(configs), "rungs": args.rungs, "rows": len(split.train_rows)}
    last = scores[:, -1]
    top_last = set(np.argsort(-last)[:3])
    for j, epochs in enumerate(rungs[:-1]):
        result[f"spearman_{epochs}_{rungs[-1]}"] = float(spearmanr(scores[:, j], last).statistic)
        result[f"top3_overlap_{epochs}_{rungs[-1]}"] = len(top_last & set(np.argsort(-scores[:, j])[:3]))
    result["seconds"] = time.perf_counter() - start
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=str))
            writer.writeheader()
            writer.writerows(rows)
    print(result_line(result))


if __name__ == "__main__":
    main()

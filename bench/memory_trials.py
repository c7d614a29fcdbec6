"""Resident memory of one worker over a long search: a real search (`pipeline.core.run_study`,
pruning, MLflow logging to temp stores) of many small trials in one process, digits by default.

    python bench/memory_trials.py                          # 50 trials of the tutorial space, 2 epochs each
    python bench/memory_trials.py --n-trials 20 --epochs 1

Prints the worker's resident set size (psutil) after the 1st, 10th and last trial: measured
when the next trial's fit begins (a pruned trial's fit never reaches its end), the last one
after the search returns. Keras keeps per-model state across trials in one process unless a
trial clears it (`keras.backend.clear_session()` in `pipeline.train`); without that the
figure climbs with every trial. Last line: `name=value` pairs ending with
`growth_mb=<after the last trial - after the 1st>`.
"""

from __future__ import annotations

import argparse
import time

from common import ROOT, result_line, temp_stores

import keras  # noqa: E402
import psutil  # noqa: E402


class TrialMemory(keras.callbacks.Callback):
    """Resident MB of this process at each fit's start: after `len(self.rss) - 1` trials."""

    def __init__(self):
        super().__init__()
        self.rss = []

    def on_train_begin(self, logs=None):
        self.rss.append(rss_mb())


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--search-space", default=str(ROOT / "search_spaces" / "seed.yaml"))
    ap.add_argument("--n-trials", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)

    from pipeline.config import Settings
    from pipeline.core import run_study
    from pipeline.data import load_dataset
    from pipeline.space import load_space

    data = load_dataset(args.dataset, 42)
    memory = TrialMemory()
    start = time.perf_counter()
    with temp_stores() as tmp:
        settings = Settings(dataset=args.dataset, search_space=args.search_space, n_trials=args.n_trials,
                            epochs=args.epochs, storage=f"sqlite:///{tmp}/optuna.db",
                            experiment_name="bench-memory-trials")
        study = run_study("search", settings, data, load_space(args.search_space), callbacks=[memory]).study
    after = memory.rss[1:] + [rss_mb()]  # after trial k: at trial k+1's start, the last after the search
    states = [t.state.name for t in study.trials]
    out = {
        "dataset": args.dataset, "trials": len(after), "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"), "epochs": args.epochs, "search_s": time.perf_counter() - start,
        "rss_mb_after_1": after[0], "rss_mb_after_10": after[min(9, len(after) - 1)],
        f"rss_mb_after_{len(after)}": after[-1], "growth_mb": after[-1] - after[0],
    }
    print(result_line(out))
    return out


if __name__ == "__main__":
    main()

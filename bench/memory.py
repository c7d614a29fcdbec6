"""Peak memory of one worker on CIFAR-10-size data: 50,000 train and 10,000 test random
uint8 images of 32x32x3 (CIFAR-10 itself is not needed), one full `main` run (search
with a small fixed model, then the refit, test scoring and model logging) in temp stores.

    python bench/memory.py                        # 1 trial of 1 epoch, hold-out split
    python bench/memory.py --cv-folds 3           # the same with 3-fold cross-validation

Prints the resident set size after imports, after the data exist, and the peak of the
whole run (ru_maxrss). Last line: `name=value` pairs ending with `peak_rss_mb=<MB>`
(target < 2048).
"""

from __future__ import annotations

import argparse
import resource
import time

from common import fixed_space, result_line, temp_stores

import numpy as np  # noqa: E402



def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def synthetic(n_train: int, n_test: int, seed: int = 0):
    from pipeline.data import CIFAR10_CLASSES, Dataset, HeldOut

    rng = np.random.default_rng(seed)
    image = lambda n: rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    label = lambda n: rng.integers(0, 10, size=n).astype(np.int32)  # noqa: E731
    return Dataset("cifar10-size", image(n_train), label(n_train), HeldOut(image(n_test), label(n_test)),
                   list(CIFAR10_CLASSES))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cv-folds", type=int, default=1)
    args = ap.parse_args(argv)

    from pipeline.cli import run
    from pipeline.config import Settings

    import tensorflow  # noqa: F401  (counted in the baseline, as in any worker)

    after_imports = rss_mb()
    data = synthetic(args.n_train, args.n_test)
    after_data = rss_mb()
    start = time.perf_counter()
    with temp_stores() as tmp:
        settings = Settings(dataset="cifar10-size", search_space=str(fixed_space(tmp, batch_size=128)), n_trials=1,
                            epochs=args.epochs, cv_folds=args.cv_folds, storage=f"sqlite:///{tmp}/optuna.db",
                            experiment_name="bench-memory")
        run("main", settings, data=data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "n_train": args.n_train, "cv_folds": args.cv_folds, "data_mb": (data.x_train.nbytes + data.test.x.nbytes) / 2**20,
        "imports_rss_mb": after_imports, "data_rss_mb": after_data, "run_s": time.perf_counter() - start,
        "peak_rss_mb": peak,
    }
    print(result_line(out))
    return out


if __name__ == "__main__":
    main()

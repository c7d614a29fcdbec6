"""What `pipeline.process` saves a command: the same `search` command run as `python -m pipeline`
(the collector off while the libraries load, the interpreter's teardown skipped) and as a plain
call of `pipeline.cli.main` (Python's defaults), alternately, each in temp stores.

    python bench/process_end.py                      # 6 trials of 1 epoch on digits, 3 pairs
    python bench/process_end.py --pairs 1 --n-trials 1

Prints one `name=value` line per run (wall and CPU seconds of the whole process), then medians
and their ratio (`cpu_ratio` = process CPU with `pipeline.process` / without).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = "depth: 1\nfirst_block: {filters: [4, 8, 16], kernel_size: [2, 3], pool_size: 2}\ndense: {units: {low: 8, high: 512}}\n"
FORMS = {"process": ["-m", "pipeline"], "plain": ["-c", "import sys; from pipeline.cli import main; sys.exit(main())"]}


def one(form: str, args) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one command in its own temp stores."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        space = Path(tmp) / "tiny.yaml"
        space.write_text(SPACE)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PYTHONPATH": str(ROOT),
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.pop("MLFLOW_RUN_ID", None)
        command = [sys.executable, *FORMS[form], "search", "--search-space", str(space), "--storage",
                   f"sqlite:///{tmp}/optuna.db", "--n-trials", str(args.n_trials), "--epochs", str(args.epochs)]
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--n-trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(argv)
    runs = {form: [] for form in FORMS}
    for _ in range(args.pairs):
        for form in FORMS:
            wall, cpu = one(form, args)
            runs[form].append((wall, cpu))
            print(f"form={form} wall_s={wall:.1f} cpu_s={cpu:.1f}", flush=True)
    out = {f"{form}_{what}_s": round(statistics.median(r[i] for r in rs), 1)
           for form, rs in runs.items() for i, what in enumerate(("wall", "cpu"))}
    out["cpu_ratio"] = round(out["process_cpu_s"] / out["plain_cpu_s"], 3)
    print(" ".join(f"{k}={v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()

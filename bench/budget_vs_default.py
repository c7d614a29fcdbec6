"""Does the search pay for itself inside a wall-clock budget? `main --time-budget B` (search, then
the refit the plan sizes) against **no search**: the space's default configuration (the warm
start) given the whole budget by the same planner (`refit --time-budget B` on a study whose one
finished trial is that configuration). Each side is its own `python -m pipeline` process, in
temp stores, one after the other, so its wall time includes starting, loading and logging.

    python bench/budget_vs_default.py --dataset ../shared/data/cifar10-train --budget 3600 \\
        --search-space search_spaces/cifar10.yaml --warm-start search_spaces/cifar10_start.yaml
    python bench/budget_vs_default.py --dataset digits --budget 60 --sides search   # a quick look

Options: `--sides search,default` (both by default), `--threads N` and `--workers N` for the
search side (`--threads` for the default side too), `--seed`, `--n-trials` (the search's cap on
evaluations; default 1000, so the budget ends it), `--extra "--rungs 1,3,9"` more options for
the search side. Prints one `name=value` line per side: test accuracy and macro F1, wall seconds
and their ratio to the budget (`overrun` = wall / budget - 1), the plan line, evaluations by
rung, refit epochs, and the process's average CPU use (cores busy, its workers included).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, result_line

import optuna  # noqa: E402


def run_side(args, side: str, folder: Path) -> dict:
    study = f"bench-{side}"
    storage = f"sqlite:///{folder}/optuna.db"
    common = ["--dataset", args.dataset, "--search-space", args.search_space, "--study-name", study,
              "--storage", storage, "--seed", str(args.seed), "--time-budget", str(args.budget),
              "--experiment-name", f"bench-{side}"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    if side == "search":
        command = ["main", *common, "--n-trials", str(args.n_trials), "--workers", str(args.workers)]
        if args.warm_start:
            command += ["--warm-start", args.warm_start]
        command += shlex.split(args.extra)
    else:
        _record_default(args, study, storage, env)
        command = ["refit", *common]
    start_cpu = os.times()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *command], cwd=folder, env=env, capture_output=True,
                          text=True)
    wall = time.monotonic() - start
    end_cpu = os.times()
    cpu = (end_cpu.children_user - start_cpu.children_user) + (end_cpu.children_system - start_cpu.children_system)
    (folder / f"{side}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"{side}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    found = lambda key: re.search(rf"^{key}=([\d.]+)$", proc.stdout, re.M)  # noqa: E731
    plan = re.search(r"^time budget .*$", proc.stdout, re.M)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    rungs = collections.Counter(t.user_attrs.get("rung", "-") for t in trials if t.state.name == "COMPLETE")
    return {
        "side": side, "test_accuracy": float(found("test_accuracy").group(1)),
        "test_f1_macro": float(found("test_f1_macro").group(1)), "wall_s": wall, "budget_s": args.budget,
        "overrun": wall / args.budget - 1, "cpu_cores": cpu / wall, "refit_epochs": int(found("refit_epochs").group(1)),
        "evaluations": sum(rungs.values()) if side == "search" else 0,
        "by_rung": ",".join(f"{k}:{v}" for k, v in sorted(rungs.items(), key=str)) if side == "search" else "-",
        "plan": f'"{plan.group(0)}"' if plan else "-",
    }


def _record_default(args, study: str, storage: str, env: dict) -> None:
    """A study whose one finished trial is the warm start's configuration, as `refit` reads it."""
    sys.path.insert(0, str(ROOT))
    from pipeline import names
    from pipeline.config import Settings
    from pipeline.space import load_space
    from pipeline.study import join_study
    from pipeline.warm_start import load_configurations

    space = load_space(args.search_space)
    settings = Settings(dataset=args.dataset, search_space=args.search_space, study_name=study, storage=storage,
                        seed=args.seed)
    _, configs = load_configurations(args.warm_start, space)
    params = next(iter(configs.values()))
    study_ = join_study(settings, space)[0]
    study_.add_trial(optuna.trial.create_trial(value=0.0, user_attrs={names.PARAMS: params, names.EPOCHS_NEEDED: 1,
                                                                      names.WARM_START: "default"}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--search-space", default=str(ROOT / "search_spaces" / "cifar10.yaml"))
    parser.add_argument("--warm-start", default=str(ROOT / "search_spaces" / "cifar10_start.yaml"))
    parser.add_argument("--sides", default="search,default")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n-trials", type=int, default=1000)
    parser.add_argument("--extra", default="")
    parser.add_argument("--keep", default="", help="folder to keep each side's stores and log in")
    args = parser.parse_args()
    args.dataset = args.dataset if args.dataset in ("digits", "cifar10") else str(Path(args.dataset).resolve())
    args.search_space, args.warm_start = str(Path(args.search_space).resolve()), str(Path(args.warm_start).resolve())
    for side in args.sides.split(","):
        with tempfile.TemporaryDirectory(prefix=f"budget-{side}-") as tmp:
            folder = Path(args.keep) / side if args.keep else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            print(result_line(run_side(args, side, folder)), flush=True)


if __name__ == "__main__":
    main()

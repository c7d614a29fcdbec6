"""Does the search pay for itself inside a wall-clock budget? `main --time-budget B` (search, then
the refit the plan sizes) against **no search**: the space's default configuration (the warm
start) given the whole budget by the same planner (`refit --time-budget B` on a study whose one
finished trial is that configuration). Each side is its own `python -m pipeline` process, in
temp stores, one after the other, so its wall time includes starting, loading and logging.

    python bench/budget_vs_default.py --dataset ../shared/data/cifar10-train --budget 3600 \\
        --search-space search_spaces/cifar10.yaml --warm-start search_spaces/cifar10_start.yaml
    python bench/budget_vs_default.py --dataset digits --budget 60 --sides search   # a quick look

A third side, `random`, is random search through the same machinery: `main --time-budget B
--sampler random --rungs off --pruner none` (the tutorial's randomized search: configurations
drawn at random, each trained as one complete run of the epochs the planner gives a trial, the
best refit), warm-started like the search side.

    python bench/budget_vs_default.py --dataset ../shared/data/cifar10-sample --budget 1200 \
        --search-space search_spaces/modern.yaml --warm-start '' --sides search,random --parallel --seeds 42,7,3

Options: `--parallel` runs the two sides at once, each pinned to its own core with one thread (the
same budget on equal hardware, in half the wall time); `--sides search,default` (both by
default; any two of search, default, random with `--parallel`); `--threads N` (every side) and
`--workers N` (the search side); `--seed`, or `--seeds 42,7,3` (one run of the sides per seed,
then each side's mean and sample standard deviation of test accuracy and evaluations);
`--warm-start ''`: none;
`--n-trials` (the search's cap on evaluations; default 1000, so the budget ends it); `--extra
"--rungs 1,3,9"`: more options for the search side. Prints one `name=value` line per side: test
accuracy and macro F1, wall seconds and their ratio to the budget (`overrun` = wall / budget - 1),
the plan line, evaluations by rung, refit epochs, and the process's average CPU use (cores busy,
its workers included).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, pipeline_env, result_line

import optuna  # noqa: E402


def run_side(args, side: str, folder: Path, core: int | None = None):
    """Start one side; returns a function that waits for it and gives its figures."""
    study = f"bench-{side}"
    storage = f"sqlite:///{folder}/optuna.db"
    common = ["--dataset", args.dataset, "--search-space", args.search_space, "--study-name", study,
              "--storage", storage, "--seed", str(args.seed), "--time-budget", str(args.budget),
              "--experiment-name", f"bench-{side}"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    env = pipeline_env(folder)
    if side == "search":
        command = ["main", *common, "--n-trials", str(args.n_trials), "--workers", str(args.workers),
                   *warm(args), *shlex.split(args.extra)]
    elif side == "random":
        command = ["main", *common, "--n-trials", str(args.n_trials), "--sampler", "random", "--rungs", "off",
                   "--pruner", "none", *warm(args)]
    else:
        _record_default(args, study, storage, env)
        command = ["refit", *common]
    pin = [] if core is None else ["taskset", "-c", str(core)]
    log = open(folder / f"{side}.log", "w+")
    start = time.monotonic()
    proc = subprocess.Popen([*pin, sys.executable, "-m", "pipeline", *command], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    return lambda: _figures(args, side, study, storage, proc, log, start)


def warm(args) -> list[str]:
    return ["--warm-start", args.warm_start] if args.warm_start else []


def _figures(args, side, study, storage, proc, log, start) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime  # the process and its workers
    log.seek(0)
    proc.stdout, proc.stderr = log.read(), ""
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
        "evaluations": sum(rungs.values()) if side != "default" else 0,
        "by_rung": ",".join(f"{k}:{v}" for k, v in sorted(rungs.items(), key=str)) if side != "default" else "-",
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
    parser.add_argument("--seeds", default="", help="comma-separated: one run of the sides per seed, then a summary")
    parser.add_argument("--n-trials", type=int, default=1000)
    parser.add_argument("--extra", default="")
    parser.add_argument("--keep", default="", help="folder to keep each side's stores and log in")
    parser.add_argument("--parallel", action="store_true", help="both sides at once, each pinned to its own core "
                                                                "with one thread")
    args = parser.parse_args()
    if args.parallel:
        args.threads = args.threads or 1
    args.dataset = args.dataset if args.dataset in ("digits", "cifar10") else str(Path(args.dataset).resolve())
    args.search_space = str(Path(args.search_space).resolve())
    args.warm_start = str(Path(args.warm_start).resolve()) if args.warm_start else ""
    sides = args.sides.split(",")
    if args.parallel and len(sides) > len(os.sched_getaffinity(0)):
        sys.exit(f"--parallel pins each side to a core of its own: {len(sides)} sides, "
                 f"{len(os.sched_getaffinity(0))} cores")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    runs = []
    for seed in seeds:
        args.seed = seed
        with tempfile.TemporaryDirectory(prefix="budget-") as tmp:
            folders = {side: Path(args.keep or tmp) / (f"{seed}-{side}" if args.seeds else side) for side in sides}
            for folder in folders.values():
                folder.mkdir(parents=True, exist_ok=True)
            if args.parallel:  # at once, one core each
                waits = [run_side(args, side, folders[side], core=i) for i, side in enumerate(sides)]
                results = [wait() for wait in waits]
            else:
                results = [run_side(args, side, folders[side])() for side in sides]
            for result in results:
                print(result_line({"seed": seed, **result}), flush=True)
            runs += results
    if len(seeds) > 1:
        print(result_line(summarize(runs, sides)), flush=True)


def summarize(runs: list[dict], sides: list[str]) -> dict:
    """Per side over the seeds: test accuracy and evaluations, mean and sample standard deviation."""
    out = {"seeds": len(runs) // len(sides)}
    for side in sides:
        for key in ("test_accuracy", "evaluations", "wall_s"):
            values = [r[key] for r in runs if r["side"] == side]
            out[f"{side}_{key}_mean"] = round(statistics.mean(values), 4)
            out[f"{side}_{key}_sd"] = round(statistics.stdev(values), 4)
    return out


if __name__ == "__main__":
    main()

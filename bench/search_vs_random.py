"""Search efficiency: the pipeline (TPE sampler + median pruning) against the tutorial's
method (random sampling, no pruning) on the same space and epoch cap, each given the same
wall-clock budget and followed by the same refit and test scoring.

    python bench/search_vs_random.py --dataset ../shared/data/cifar10-sample --budget-minutes 20
    python bench/search_vs_random.py --dataset digits --budget-minutes 1 --epochs 5   # a quick look

Both sides run the pipeline's own core sequence (`pipeline.core.run_study`: search, then
refit) in temp stores; the random side is `sampler=random` with `pruner=none`. Search
seconds include the study report (plots) each side logs. Data are loaded once and shared. The budget
is Optuna's `timeout`: no trial starts after it, the running one finishes.

Options: `--seeds 42,7,3` runs once per seed (the seed also draws the splits) and ends with
the mean and standard deviation over the seeds; `--parallel` runs the two sides at once,
each a process of one TensorFlow thread pinned to its own core (the same budget on equal
hardware, in half the wall time); `--sides pipeline` (or `random`) runs one side,
`--pruner` swaps the pipeline's pruner, `--threads N` limits TensorFlow's threads, and
`--trials-csv FILE` writes every trial (seed, side, params, state, value, epochs, times).

Prints, for both: best validation accuracy, test accuracy, trials completed / pruned,
epochs spent, search and refit seconds, and how long the pipeline took to first match
random search's best validation accuracy, as a ratio of the time random search took
to reach it (`time_ratio`), and whether an earlier issue's target is met (`target_met`: +3
test points, or `time_ratio` <= 1/3), as a `name=value` line per seed. With several seeds the
last line gives, per side, the test accuracy's mean and standard deviation and the seconds to
reach random search's median best validation accuracy (mean, sd, and in how many runs).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import ROOT, result_line, temp_stores

import numpy as np  # noqa: E402
import optuna  # noqa: E402

from pipeline import names  # noqa: E402
from pipeline.config import Settings  # noqa: E402


def epochs_spent(trial: optuna.trial.FrozenTrial) -> int:
    """Epochs a trial trained: its own count, or the steps it reported before pruning."""
    return int(trial.user_attrs.get(names.EPOCHS_RUN, len(trial.intermediate_values)))


def trial_rows(trials) -> list[list]:
    """One CSV row per trial: number, state, value, epochs, start and end seconds from the
    side's first trial, per-epoch scores, params."""
    t0 = min(t.datetime_start for t in trials)
    rows = []
    for t in trials:
        end = (t.datetime_complete - t0).total_seconds() if t.datetime_complete else ""
        steps = " ".join(f"{v:.4f}" for _, v in sorted(t.intermediate_values.items()))
        rows.append([t.number, t.state.name, t.value, epochs_spent(t), (t.datetime_start - t0).total_seconds(),
                     end, steps, t.user_attrs.get(names.PARAMS)])
    return rows


def run_side(data, space, settings: Settings) -> dict:
    from pipeline.core import run_study

    start = time.perf_counter()
    study = run_study("search", settings, data, space).study
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = run_study("refit", settings, data, space).metrics
    refit_s = time.perf_counter() - start
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    rows = trial_rows(trials)
    return {
        "best_val_accuracy": study.best_value,
        "test_accuracy": metrics["test_accuracy"],
        "complete": states.count(optuna.trial.TrialState.COMPLETE),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "epochs": sum(epochs_spent(t) for t in trials),
        "search_s": search_s,
        "refit_s": refit_s,
        "rows": rows,
    }


def time_to_reach(rows: list[list], target: float) -> float:
    """Seconds from the side's first trial start until a complete trial first scored >= target."""
    done = sorted((r[5], r[2]) for r in rows if r[1] == "COMPLETE")
    return next((end for end, value in done if value >= target), float("nan"))


def write_trials(path: str, runs: list[dict]) -> None:
    """One row per trial of every side of every run: seed, side, then `trial_rows`' columns."""
    import csv

    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seed", "side", "number", "state", "value", "epochs", "start_s", "end_s", "steps", "params"])
        for run in runs:
            for side, r in run["sides"].items():
                out.writerows([run["seed"], side, *row] for row in r["rows"])


def side_settings(args, seed: int, tmp: Path) -> dict[str, Settings]:
    base = Settings(dataset=args.dataset, search_space=args.search_space, n_trials=100_000,
                    timeout=max(1, round(args.budget_minutes * 60)), epochs=args.epochs, seed=seed,
                    threads=args.threads, storage=f"sqlite:///{tmp}/optuna.db",
                    experiment_name="bench-search-vs-random")
    return {
        "pipeline": base.replace(study_name="pipeline", pruner=args.pruner or base.pruner),
        "random": base.replace(study_name="random", sampler="random", pruner="none"),
    }


def run_sides_here(args, seed: int, sides: list[str]) -> dict:
    """The sides one after the other in this process, on the data loaded once."""
    from pipeline.data import HeldOut, load_dataset
    from pipeline.space import load_space

    space = load_space(args.search_space)
    data = load_dataset(args.dataset, seed)
    results = {}
    with temp_stores() as tmp:
        settings = side_settings(args, seed, tmp)
        for name in sides:
            data.test = HeldOut(data.test.x, data.test.y)  # each side opens the test split once
            results[name] = run_side(data, space, settings[name])
    return results


def run_sides_apart(args, seed: int) -> dict:
    """Both sides at once, each a process of one TensorFlow thread pinned to its own core:
    the same wall-clock budget on equal hardware, in half the time."""
    import json
    import subprocess
    import sys
    import tempfile

    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="svr-") as tmp:
        procs = {}
        for core, side in zip(cores, ("pipeline", "random")):
            cmd = [sys.executable, __file__, "--dataset", args.dataset, "--budget-minutes", str(args.budget_minutes),
                   "--search-space", args.search_space, "--epochs", str(args.epochs), "--seeds", str(seed),
                   "--sides", side, "--threads", "1", "--json", f"{tmp}/{side}.json"]
            if args.pruner:
                cmd += ["--pruner", args.pruner]
            log = open(f"{tmp}/{side}.log", "w")
            procs[side] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           preexec_fn=lambda c=core: os.sched_setaffinity(0, {c}))
        results = {}
        for side, proc in procs.items():
            if proc.wait():
                raise SystemExit(f"the {side} side failed:\n" + Path(f"{tmp}/{side}.log").read_text()[-3000:])
            results[side] = json.loads(Path(f"{tmp}/{side}.json").read_text())[side]
    return results


def compare(results: dict) -> dict:
    """The pipeline against random search within one run (one seed)."""
    out = {f"{name}_{k}": v for name, r in results.items() for k, v in r.items() if k != "rows"}
    if len(results) == 2:
        target = results["random"]["best_val_accuracy"]
        out["random_s_to_random_best"] = time_to_reach(results["random"]["rows"], target)
        out["pipeline_s_to_random_best"] = time_to_reach(results["pipeline"]["rows"], target)
        out["time_ratio"] = out["pipeline_s_to_random_best"] / out["random_s_to_random_best"]  # nan: never reached
        out["test_gain_points"] = 100 * (results["pipeline"]["test_accuracy"] - results["random"]["test_accuracy"])
        # an earlier issue's target: +3 test points, or random search's best validation score in a third of its time
        out["target_met"] = out["test_gain_points"] >= 3 or out["time_ratio"] <= 1 / 3
    return out


def summarize(runs: list[dict]) -> dict:
    """Over the seeds: per side the mean and standard deviation of the test accuracy, and of
    the seconds to reach random search's median best validation accuracy (over the runs
    that reached it; `_reached` counts them)."""
    target = float(np.median([run["sides"]["random"]["best_val_accuracy"] for run in runs]))
    out = {"seeds": len(runs), "random_median_best": round(target, 4)}
    for side in ("pipeline", "random"):
        test = [run["sides"][side]["test_accuracy"] for run in runs]
        reach = [time_to_reach(run["sides"][side]["rows"], target) for run in runs]
        reached = [s for s in reach if not np.isnan(s)]
        out.update({f"{side}_test_mean": np.mean(test), f"{side}_test_sd": np.std(test, ddof=1),
                    f"{side}_s_to_median_best_mean": np.mean(reached) if reached else float("nan"),
                    f"{side}_s_to_median_best_sd": np.std(reached, ddof=1) if len(reached) > 1 else float("nan"),
                    f"{side}_reached": len(reached)})
    return {k: round(float(v), 4) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--budget-minutes", type=float, required=True, help="search budget of each side")
    ap.add_argument("--search-space", default=str(ROOT / "search_spaces" / "seed.yaml"))
    ap.add_argument("--epochs", type=int, default=10, help="epoch cap of every trial, both sides")
    ap.add_argument("--seeds", default="42", help="comma-separated: one run (both sides) per seed")
    ap.add_argument("--pruner", default=None, help="the pipeline side's pruner (default: the pipeline's default)")
    ap.add_argument("--sides", default="pipeline,random", help="which sides to run, comma-separated")
    ap.add_argument("--parallel", action="store_true", help="run the two sides at once, one core each")
    ap.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0 = one per core)")
    ap.add_argument("--trials-csv", default="", help="write every trial (params, state, value, epochs, times) here")
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)  # a --parallel side's results
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    sides = args.sides.split(",")
    if args.parallel and (sides != ["pipeline", "random"] or len(os.sched_getaffinity(0)) < 2):
        raise SystemExit("--parallel runs both sides on two cores of their own: it needs both sides and 2 cores")

    from pipeline.device import set_threads

    set_threads(args.threads)  # before TensorFlow runs an op
    runs = []
    for seed in seeds:
        results = run_sides_apart(args, seed) if args.parallel else run_sides_here(args, seed, sides)
        if args.json:
            import json

            Path(args.json).write_text(json.dumps(results))
        for name, r in results.items():
            print(f"seed {seed}, {name}: best val_accuracy {r['best_val_accuracy']:.4f}, "
                  f"test_accuracy {r['test_accuracy']:.4f}, {r['complete']} complete / {r['pruned']} pruned, "
                  f"{r['epochs']} epochs, search {r['search_s']:.0f} s, refit {r['refit_s']:.0f} s", flush=True)
        out = {"dataset": args.dataset, "budget_min": args.budget_minutes, "epochs_cap": args.epochs, "seed": seed,
               "pruner": args.pruner or Settings().pruner, "parallel": args.parallel, **compare(results)}
        print(result_line(out), flush=True)
        runs.append({"seed": seed, "sides": results, "out": out})
    if args.trials_csv:
        write_trials(args.trials_csv, runs)
    if len(runs) > 1 and sides == ["pipeline", "random"]:
        out = summarize(runs)
        print(result_line(out))
    return out


if __name__ == "__main__":
    main()

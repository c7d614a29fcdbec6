"""Search efficiency: the pipeline (TPE sampler + median pruning) against the tutorial's
method (random sampling, no pruning) on the same space and epoch cap, each given the same
wall-clock budget and followed by the same refit and test scoring.

    python bench/search_vs_random.py --dataset ../shared/data/cifar10-sample --budget-minutes 20
    python bench/search_vs_random.py --dataset digits --budget-minutes 1 --epochs 5   # a quick look

Both sides run the pipeline's own core sequence (`pipeline.core.run_study`: search, then
refit) in temp stores; the random side is `sampler=random` with `pruner=none`. Search
seconds include the study report (plots) each side logs. Data are loaded once and shared. The budget
is Optuna's `timeout`: no trial starts after it, the running one finishes.

Options: `--sides pipeline` (or `random`) runs one side, `--pruner` swaps the pipeline's
pruner, `--threads N` limits TensorFlow's threads (several benches on one machine), and
`--trials-csv FILE` writes every trial (params, state, value, epochs, start/end seconds).

Prints, for both: best validation accuracy, test accuracy, trials completed / pruned,
epochs spent, search and refit seconds, and how long the pipeline took to first match
random search's best validation accuracy, as a ratio of the time random search took
to reach it (`time_ratio`), and whether the issue's target is met (`target_met`: +3 test
points, or `time_ratio` <= 1/3). Last line: `name=value` pairs.
"""

from __future__ import annotations

import argparse
import time

from common import ROOT, result_line, temp_stores

import optuna  # noqa: E402

from pipeline import names  # noqa: E402
from pipeline.config import Settings  # noqa: E402


def epochs_spent(trial: optuna.trial.FrozenTrial) -> int:
    """Epochs a trial trained: its own count, or the steps it reported before pruning."""
    return int(trial.user_attrs.get(names.EPOCHS_RUN, len(trial.intermediate_values)))


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
    return {
        "best_val_accuracy": study.best_value,
        "test_accuracy": metrics["test_accuracy"],
        "complete": states.count(optuna.trial.TrialState.COMPLETE),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "epochs": sum(epochs_spent(t) for t in trials),
        "search_s": search_s,
        "refit_s": refit_s,
        "trials": trials,
    }


def time_to_reach(trials, target: float) -> float:
    """Seconds from the first trial's start until a complete trial first scored >= target."""
    start = min(t.datetime_start for t in trials)
    done = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    for t in done:
        if t.value >= target:
            return (t.datetime_complete - start).total_seconds()
    return float("nan")


def write_trials(path: str, results: dict) -> None:
    """One row per trial of every side: side, number, state, value, epochs, start and end
    seconds from the side's first trial, params."""
    import csv

    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["side", "number", "state", "value", "epochs", "start_s", "end_s", "steps", "params"])
        for side, r in results.items():
            t0 = min(t.datetime_start for t in r["trials"])
            for t in r["trials"]:
                end = (t.datetime_complete - t0).total_seconds() if t.datetime_complete else ""
                steps = " ".join(f"{v:.4f}" for _, v in sorted(t.intermediate_values.items()))
                out.writerow([side, t.number, t.state.name, t.value, epochs_spent(t),
                              (t.datetime_start - t0).total_seconds(), end, steps, t.user_attrs.get(names.PARAMS)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--budget-minutes", type=float, required=True, help="search budget of each side")
    ap.add_argument("--search-space", default=str(ROOT / "search_spaces" / "seed.yaml"))
    ap.add_argument("--epochs", type=int, default=10, help="epoch cap of every trial, both sides")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--pruner", default=None, help="the pipeline side's pruner (default: the pipeline's default)")
    ap.add_argument("--sides", default="pipeline,random", help="which sides to run, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0 = one per core)")
    ap.add_argument("--trials-csv", default="", help="write every trial (params, state, value, epochs, times) here")
    args = ap.parse_args(argv)

    from pipeline.data import HeldOut, load_dataset
    from pipeline.device import set_threads
    from pipeline.space import load_space

    set_threads(args.threads)  # before TensorFlow runs an op

    space = load_space(args.search_space)
    data = load_dataset(args.dataset, args.seed)
    results = {}
    with temp_stores() as tmp:
        base = Settings(dataset=args.dataset, search_space=args.search_space, n_trials=100_000,
                        timeout=max(1, round(args.budget_minutes * 60)), epochs=args.epochs, seed=args.seed,
                        threads=args.threads, storage=f"sqlite:///{tmp}/optuna.db",
                        experiment_name="bench-search-vs-random")
        sides = {
            "pipeline": base.replace(study_name="pipeline", pruner=args.pruner or base.pruner),
            "random": base.replace(study_name="random", sampler="random", pruner="none"),
        }
        for name in args.sides.split(","):
            data.test = HeldOut(data.test.x, data.test.y)  # each side opens the test split once
            results[name] = run_side(data, space, sides[name])
            r = results[name]
            print(f"{name}: best val_accuracy {r['best_val_accuracy']:.4f}, test_accuracy {r['test_accuracy']:.4f}, "
                  f"{r['complete']} complete / {r['pruned']} pruned, {r['epochs']} epochs, "
                  f"search {r['search_s']:.0f} s, refit {r['refit_s']:.0f} s", flush=True)
    if args.trials_csv:
        write_trials(args.trials_csv, results)
    out = {"dataset": args.dataset, "budget_min": args.budget_minutes, "epochs_cap": args.epochs,
           "pruner": sides["pipeline"].pruner}
    for name, r in results.items():
        out.update({f"{name}_{k}": v for k, v in r.items() if k != "trials"})
    if len(results) == 2:
        target = results["random"]["best_val_accuracy"]
        out["random_s_to_random_best"] = time_to_reach(results["random"]["trials"], target)
        out["pipeline_s_to_random_best"] = time_to_reach(results["pipeline"]["trials"], target)
        out["time_ratio"] = out["pipeline_s_to_random_best"] / out["random_s_to_random_best"]  # nan: never reached
        out["test_gain_points"] = 100 * (results["pipeline"]["test_accuracy"] - results["random"]["test_accuracy"])
        # the target: +3 test points, or random search's best validation score in a third of its time
        out["target_met"] = out["test_gain_points"] >= 3 or out["time_ratio"] <= 1 / 3
    print(result_line(out))
    return out


if __name__ == "__main__":
    main()

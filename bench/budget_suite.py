"""Issue 36's suite: what a wall-clock budget buys on four data sets, four ways, each through the
same planner, refit and test (`python -m pipeline main --time-budget B`, one process a side):

- `search`: the search (`--n-trials 100000`, so the budget ends it), then the refit the plan sizes;
- `default`: the same command with `--search-share 0`: the space's `default` configuration
  trained for the whole budget, no search;
- `random`: the same command with `--sampler random` (random search through the same machinery);
- `kerastuner`: KerasTuner's Hyperband (keras-tuner 1.4.8), the tool a Keras user would pick
  instead, over the same space (`SearchSpace.sample` through `Suggest`, an adapter of Optuna's
  `suggest_*` to KerasTuner's Choice / Int / Float), the same model (`pipeline.train.model_for`:
  `build_model` with its schedule and whitening) and the same training and validation rows
  (`pipeline.train.validation_splits` with the run's seed and `val_fraction`), in a process of
  its own that is killed when the search share ends (Hyperband has no time limit). The search
  share is the search side's own, `plan_search_until` less its process's start, from its record
  for the same data set, budget and seed; without one, `--kt-share` (0.5) of the budget. Its
  best completed trial is written as a one-configuration warm start and refit by our planner:
  `main --warm-start best.yaml --search-share 0 --time-budget <B less the seconds Hyperband used>`.

    python bench/budget_suite.py                          # the whole grid: 50 jobs, about 7 h on 2 cores
    python bench/budget_suite.py --datasets photos --budgets 600 --seeds 42   # a part
    python bench/budget_suite.py --datasets digits --budgets 40 --sides search,kerastuner  # plumbing
    python bench/budget_suite.py --dry-run                # print the commands, run nothing
    python bench/budget_suite.py --report                 # the table and the plot, from the records
    python bench/budget_suite.py --datasets sample --budgets 600 --sides fixed-a93,fixed-a95  # cost-axis points

The grid (issue 36): at 600 s every side on digits, sample and photos, seeds 42, 7, 3; at 1,800 s
search, default and kerastuner on sample and photos, seeds 42, 7; at 3,600 s search and default on
cifar10, seed 42. `--datasets`, `--budgets`, `--sides`, `--seeds` (comma lists) pick a part of it;
a budget outside the grid runs the data sets, sides and seeds asked for (default: digits, every
side, seed 42). Data sets (DATASETS below): `digits` (built in, seed.yaml), `sample` (the 10,000-
image CIFAR-10 sample, airbench.yaml), `photos` (bench/photo_set.py's 3,781 clothing photos at
64 px, photos.yaml; 64 px as its space was written for: 3 or 4 pooling blocks end at 8x8 or 4x4,
and an epoch stays short: a trial's 2,419 training rows took about 10 s on one core at widths
32/64/128 with residual blocks, 6 epochs reaching 0.666 validation accuracy, so there is room to
find) and `cifar10` (the full 50,000, as 40,000 train and a 10,000 test split, airbench.yaml).

Two jobs at once, each pinned to its own core (`taskset -c 0`, `-c 1`) with `--threads 1`, in the
grid's order, so that a seed's sides run side by side and machine drift hits them alike (a
kerastuner job waits for its search job, whose share it takes). Each (data set, budget, side,
seed) writes one record, bench/results/budget/<CPU kind>/<data set>-<budget>-<side>-<seed>.json
(<CPU kind>: model name, family and model number, as amd-epyc-f25-m17): the command, commit, date
(UTC), CPU (model, family, model number, AVX-512 BF16, AMX, cores) and load average before and
after, test accuracy and macro F1, configurations evaluated (and by rung), refit epochs, wall
seconds against the budget, the plan line and the plan's search seconds, and the lines the run
prints about the default and a challenger, read from the run's MLflow parent run and its Optuna
study. A rerun on a machine of the same kind skips what is recorded, so the suite runs in parts
and resumes after an interruption; another kind of CPU measures afresh (a budget buys other
epochs there). A job that crashed writes no record, and its log stays beside where the record
would be (<key>.log; the stores of every job under runs/<key>/, not committed; `--results DIR`:
another folder). At the end (or with `--report` alone) it prints, per data set, budget, CPU kind
and side, mean ± sd of test accuracy over the seeds, configurations evaluated, refit epochs and
wall time against budget, and draws bench/results/budget/budget_suite.png: test accuracy against
budget, one panel per data set and CPU kind, one line per side.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, kind_folder, machine, pipeline_env

SPACES = ROOT / "search_spaces"
DATA = ROOT.parent  # ../shared/data and ../data beside the checkout (/work)


@dataclasses.dataclass(frozen=True)
class DataSet:
    dataset: str  # --dataset
    space: Path  # --search-space
    image_size: int = 0  # --image-size (0: native)
    kt_max_epochs: int = 9  # Hyperband's max_epochs: about the refit's epochs at 600 s, so that its
    # first bracket (9 configurations of 1 epoch, 3 of 3, 1 of 9 at factor 3) about fills the share


DATASETS = {
    "digits": DataSet("digits", SPACES / "seed.yaml", kt_max_epochs=27),
    "sample": DataSet(str(DATA / "shared/data/cifar10-sample"), SPACES / "airbench.yaml"),
    "photos": DataSet(str(DATA / "data/photos-clothing"), SPACES / "photos.yaml", image_size=64),
    "cifar10": DataSet(str(DATA / "shared/data/cifar10-train"), SPACES / "airbench.yaml", kt_max_epochs=3),
    # where photos.yaml's `default` is chosen (issue 36: the best of a few candidates on the CIFAR-10
    # sample, not on the photos it is scored on), at the sample's own 32 px
    "sample-photos": DataSet(str(DATA / "shared/data/cifar10-sample"), SPACES / "photos.yaml"),
}
SIDES = ("search", "default", "random", "kerastuner")
VARIANTS = {  # a side with one setting changed (issue 40: imbalanced classes; issue 37: precision)
    "search-f1": ["--metric", "val_f1_macro"],
    "search-balanced": ["--class-weight", "balanced"],
    "default-float32": ["--search-share", "0", "--precision", "float32"],  # issue 37: what bfloat16 buys at equal time
}
FIXED = "fixed-"  # `fixed-<name>`: bench/cost_axis.yaml's configuration <name> trained for the whole budget
COST_AXIS = ROOT / "bench" / "cost_axis.yaml"
GRID = [  # (budget, data sets, sides, seeds)
    (600, ("digits", "sample", "photos"), SIDES, (42, 7, 3)),
    (1800, ("sample", "photos"), ("search", "default", "kerastuner"), (42, 7)),
    (3600, ("cifar10",), ("search", "default"), (42,)),
]
RESULTS = ROOT / "bench" / "results" / "budget"
N_TRIALS = 100000  # the study's cap on evaluations: the budget ends the search, not this
KT_PROJECT = "hyperband"
DECISION = re.compile(r"\b(challenger|default)\b", re.I)  # the summary's lines on what the refit took


@dataclasses.dataclass(frozen=True)
class Job:
    data: str
    budget: int
    side: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.data}-{self.budget}-{self.side}-{self.seed}"

    @property
    def record(self) -> Path:
        return here() / f"{self.key}.json"

    @property
    def folder(self) -> Path:
        return RESULTS / "runs" / self.key


def jobs(datasets=(), budgets=(), sides=(), seeds=()) -> list[Job]:
    """The grid's jobs that the filters allow (an empty filter allows all), in the order they run:
    per budget, data set and seed, the sides in SIDES' order. A budget outside the grid runs
    the data sets, sides and seeds asked for (digits, every side, seed 42 where not asked)."""
    fixed = tuple(side for side in sides if side.startswith(FIXED) or side in VARIANTS)  # outside the grid: as asked
    grid = list(GRID) + [(b, datasets or ("digits",), sides or SIDES, seeds or (42,))
                         for b in budgets if b not in {g[0] for g in GRID}]
    grid += [(b, datasets, fixed, seeds or (42,)) for b in budgets if fixed and b in {g[0] for g in GRID}]
    out = []
    for budget, data_sets, sides_, seeds_ in grid:
        if budgets and budget not in budgets:
            continue
        for data in data_sets:
            for seed in seeds_:
                out += [Job(data, budget, side, seed) for side in sides_ if (not datasets or data in datasets)
                        and (not sides or side in sides) and (not seeds or seed in seeds)
                        and (not side.startswith(FIXED) or side.removeprefix(FIXED) in cost_axis(data))]
    return out


def cost_axis(data: str) -> set[str]:
    """The names of bench/cost_axis.yaml's configurations made for `data`'s space."""
    import yaml

    docs = yaml.safe_load_all(COST_AXIS.read_text())
    return {name for doc in docs if Path(doc["search_space"]).name == DATASETS[data].space.name
            for name in doc["configurations"]}


def pipeline_command(job: Job, folder: Path, budget: int | None = None, warm_start: Path | None = None) -> list[str]:
    """The side's `python -m pipeline main` arguments (the kerastuner side's refit: `budget` and
    its `warm_start`)."""
    d = DATASETS[job.data]
    command = ["main", "--dataset", d.dataset, "--search-space", str(d.space), "--seed", str(job.seed),
               "--time-budget", str(job.budget if budget is None else budget), "--threads", "1",
               "--n-trials", str(N_TRIALS), "--study-name", f"suite-{job.key}",
               "--storage", f"sqlite:///{folder}/optuna.db", "--experiment-name", f"suite-{job.key}"]
    if d.image_size:
        command += ["--image-size", str(d.image_size)]
    if job.side == "default":
        command += ["--search-share", "0"]
    elif job.side == "random":
        command += ["--sampler", "random"]
    elif job.side == "kerastuner":
        command += [*(["--warm-start", str(warm_start)] if warm_start else []), "--search-share", "0"]
    elif job.side in VARIANTS:
        command += VARIANTS[job.side]
    elif job.side.startswith(FIXED):  # a cost-axis point trained for the whole budget, no search
        command += ["--warm-start", str(COST_AXIS), "--only", job.side.removeprefix(FIXED), "--search-share", "0"]
    return command


def kerastuner_command(job: Job, folder: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "kerastuner-worker", "--data", job.data,
            "--seed", str(job.seed), "--directory", str(folder / "kerastuner")]


def pinned(core: int | None) -> list[str]:
    return [] if core is None else ["taskset", "-c", str(core)]


# --- one job -----------------------------------------------------------------------------------

class Crashed(Exception):
    pass


def run_job(job: Job, core: int | None, kt_share: float) -> dict:
    """Run one job in a fresh folder; its record (also written to disk). Raises Crashed."""
    shutil.rmtree(job.folder, ignore_errors=True)  # a crashed earlier try's study must not resume
    job.folder.mkdir(parents=True)
    here().mkdir(parents=True, exist_ok=True)
    log_path = here() / f"{job.key}.log"
    before = machine()
    started = time.time()
    with open(log_path, "w") as log:
        if job.side == "kerastuner":
            figures = run_kerastuner(job, core, kt_share, log)
        else:
            command = pipeline_command(job, job.folder)
            figures = {"command": shlex_join(pinned(core) + [sys.executable, "-m", "pipeline", *command]),
                       **run_pipeline(job, command, core, log)}
    record = {"data": job.data, "dataset": DATASETS[job.data].dataset, "space": DATASETS[job.data].space.name,
              "budget_s": job.budget, "side": job.side, "seed": job.seed,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "started": started,
              **{k: v for k, v in before.items() if k != "load"}, "load_before": before["load"],
              "load_after": machine()["load"], "core": core, **figures}
    record["overrun"] = round(record["wall_s"] / job.budget - 1, 4)
    job.record.write_text(json.dumps(record, indent=1) + "\n")
    for path in (job.folder / "mlruns", job.folder / "kerastuner"):  # models and checkpoints: not kept
        shutil.rmtree(path, ignore_errors=True)
    return record


def shlex_join(args) -> str:
    return shlex.join(map(str, args))


def run_pipeline(job: Job, command: list[str], core: int | None, log) -> dict:
    """Run `python -m pipeline <command>` in the job's folder, pinned; its figures."""
    start = time.monotonic()
    proc = subprocess.run([*pinned(core), sys.executable, "-m", "pipeline", *command], cwd=job.folder,
                          env=pipeline_env(job.folder), stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    if proc.returncode:
        raise Crashed(f"python -m pipeline exited {proc.returncode}")
    return {"wall_s": round(wall, 1), **figures(job, command)}


def figures(job: Job, command: list[str]) -> dict:
    """A finished run's figures from its Optuna study and its MLflow parent run."""
    import optuna
    from mlflow import MlflowClient

    from pipeline import names

    storage = command[command.index("--storage") + 1]
    study = optuna.load_study(study_name=command[command.index("--study-name") + 1], storage=storage)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    rungs = collections.Counter(str(t.user_attrs.get("rung", "-")) for t in complete)
    run = MlflowClient(tracking_uri=f"sqlite:///{job.folder}/mlflow.db").get_run(study.user_attrs[names.PARENT_RUN])
    metrics, tags = run.data.metrics, run.data.tags
    log = (here() / f"{job.key}.log").read_text(errors="replace")
    refit_epochs = metrics.get("refit_epochs")
    return {
        "test_accuracy": metrics.get("test_accuracy"), "test_f1_macro": metrics.get("test_f1_macro"),
        "configurations": len(complete), "by_rung": dict(sorted(rungs.items())),
        "refit_epochs": int(refit_epochs) if refit_epochs is not None else None,
        "plan": tags.get("plan"), "plan_search_seconds": metrics.get("plan_search_seconds"),
        "plan_search_until": metrics.get("plan_search_until"), "plan_refit_epochs": metrics.get("plan_refit_epochs"),
        "decision": [line.strip() for line in log.splitlines()
                     if DECISION.search(line) and not line.startswith("  ") and "=" not in line.split()[0]],
        "metrics": {k: v for k, v in sorted(metrics.items()) if not k.startswith(("test_precision_", "test_recall_"))
                    and not (k.startswith("test_f1_") and k != "test_f1_macro")},
    }


def kt_share_seconds(job: Job, kt_share: float) -> tuple[float, str]:
    """Seconds from its start that the kerastuner side searches: the search side's own search
    time from its record (its plan's `plan_search_until` less its process's start), else
    `kt_share` of the budget."""
    search = Job(job.data, job.budget, "search", job.seed).record
    if search.exists():
        rec = json.loads(search.read_text())
        if rec.get("plan_search_until"):
            return max(0.0, rec["plan_search_until"] - rec["started"]), f"{search.name}: plan_search_until - started"
        if rec.get("plan_search_seconds") is not None:
            return rec["plan_search_seconds"], f"{search.name}: plan_search_seconds"
    return kt_share * job.budget, f"--kt-share {kt_share}"


def run_kerastuner(job: Job, core: int | None, kt_share: float, log) -> dict:
    """Hyperband in a process of its own until the search share ends, then our planner's refit of
    its best configuration for the rest of the budget."""
    share, source = kt_share_seconds(job, kt_share)
    worker = [*pinned(core), *kerastuner_command(job, job.folder)]
    start = time.monotonic()
    proc = subprocess.Popen(worker, cwd=job.folder, env=pipeline_env(job.folder), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        if proc.wait(timeout=share):
            raise Crashed(f"the KerasTuner worker exited {proc.returncode}")
        ended = "finished"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        ended = "killed at the end of its share"
    best, trials = kt_best(job.data, job.folder / "kerastuner")
    warm = job.folder / "kerastuner_best.yaml"
    if best is not None:
        write_warm_start(warm, DATASETS[job.data].space, best["params"], best["trial_id"])
    kt_seconds = time.monotonic() - start
    refit_budget = max(1, math.floor(job.budget - kt_seconds))
    command = pipeline_command(job, job.folder, budget=refit_budget, warm_start=warm if best else None)
    print(f"kerastuner: {trials} trials completed in {kt_seconds:.1f} s ({ended}; share {share:.0f} s from "
          f"{source}); best: {best}; refit with --time-budget {refit_budget}", file=log, flush=True)
    refit = run_pipeline(job, command, core, log)
    return {"command": shlex_join(worker) + " && " + shlex_join(pinned(core) + [sys.executable, "-m", "pipeline",
                                                                                  *command]),
            **refit, "wall_s": round(kt_seconds + refit["wall_s"], 1), "configurations": trials,
            "kt_seconds": round(kt_seconds, 1), "kt_share_seconds": round(share, 1), "kt_share_source": source,
            "kt_ended": ended, "kt_best": best, "refit_budget_s": refit_budget,
            "refit_wall_s": refit["wall_s"], "refit_configurations": refit["configurations"]}


# --- KerasTuner ----------------------------------------------------------------------------------

class Suggest:
    """Optuna's `suggest_*`, which `SearchSpace.sample(trial)` calls, on KerasTuner's
    HyperParameters: a choice is `hp.Choice` (values of mixed types go by their repr), an int
    or float range `hp.Int` / `hp.Float`, log ranges with log sampling. `declare=True` (KerasTuner's
    `declare_hyperparameters`) takes the deepest `depth`, so every block's settings are declared
    before the first trial and Hyperband draws them all (a setting first met later would keep its
    default)."""

    def __init__(self, hp, declare: bool = False):
        self.hp, self.declare = hp, declare

    def suggest_categorical(self, name, choices):
        choices = list(choices)
        kinds = {type(c) for c in choices}
        plain = len(kinds) == 1 and kinds <= {int, float, str, bool}
        labels = choices if plain else [repr(c) for c in choices]
        value = self.hp.Choice(name, labels)
        value = value if plain else choices[labels.index(value)]
        return max(choices) if self.declare and name == "depth" else value

    def suggest_int(self, name, low, high, step=1, log=False):
        value = self.hp.Int(name, int(low), int(high), step=None if log else int(step or 1),
                            sampling="log" if log else "linear")
        return int(high) if self.declare and name == "depth" else min(max(int(value), int(low)), int(high))

    def suggest_float(self, name, low, high, step=None, log=False):
        value = self.hp.Float(name, float(low), float(high), step=None if log else step,
                              sampling="log" if log else "linear")
        return min(max(float(value), float(low)), float(high))


def hypermodel(space, split, input_shape: tuple, n_classes: int, seed: int, policy: str = "float32"):
    """A KerasTuner HyperModel of `space` on the pipeline's model and data path: `build` is
    `model_for` (the schedule spanning the epochs Hyperband gives this run, the whitening stem
    fitted to the training rows) under the dtype `policy` the pipeline would train in (KerasTuner
    clears Keras' session before each build, which resets the policy to float32), `fit` trains on
    `split`'s training rows, reshuffled per epoch and with the space's flips and weight averaging
    (`fit_callbacks`), and validates on its validation rows."""
    import keras
    import keras_tuner

    from pipeline.train import fit_callbacks, forget_custom_gradients, fresh_start, model_for

    class SpaceModel(keras_tuner.HyperModel):
        def declare_hyperparameters(self, hp):
            space.sample(Suggest(hp, declare=True))

        def build(self, hp):
            params = space.sample(Suggest(hp))
            epochs = hp.values.get("tuner/epochs", 1) - hp.values.get("tuner/initial_epoch", 0)
            keras.mixed_precision.set_global_policy(policy)
            fresh_start(seed)
            return model_for(params, input_shape, n_classes, split.images, split.train_rows, max(1, epochs))

        def fit(self, hp, model, *args, epochs=1, initial_epoch=0, callbacks=(), **kwargs):
            params = space.sample(Suggest(hp))
            batch_size = params.get("batch_size", 32)
            callbacks, flips = fit_callbacks(params, split.images, seed, list(callbacks))
            with forget_custom_gradients():
                return model.fit(split.train_batches(batch_size, seed, flips),
                                 validation_data=split.val_batches(batch_size), epochs=epochs,
                                 initial_epoch=initial_epoch, callbacks=callbacks, shuffle=False, verbose=0)

    return SpaceModel()


def kerastuner_search(data: str, seed: int, directory: Path, max_epochs: int | None = None,
                      iterations: int = 10**6, threads: int = 1) -> None:
    """Hyperband over the data set's space until it is killed (or `iterations` are done)."""
    from pipeline.device import set_threads

    set_threads(threads)
    import keras_tuner

    from pipeline.config import Settings
    from pipeline.data import load_dataset
    from pipeline.device import configure, dtype_policy
    from pipeline.space import load_space
    from pipeline.train import validation_splits

    d = DATASETS[data]
    settings = Settings(dataset=d.dataset, search_space=str(d.space), seed=seed, image_size=d.image_size)
    print(f"device: {configure(settings)}", flush=True)  # the precision the pipeline's sides train in
    dataset = load_dataset(settings.dataset, settings.seed, settings.image_size)
    split = validation_splits(dataset.x_train, dataset.y_train, 1, settings.val_fraction, settings.seed)[0]
    space = load_space(settings.search_space)
    class Hyperband(keras_tuner.Hyperband):
        def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
            """No TensorBoard callback is given: skip KerasTuner's import of tensorboard for
            one (a TensorFlow backend's trial imports it unconditionally; not installed here)."""

    tuner = Hyperband(
        hypermodel(space, split, dataset.input_shape, dataset.n_classes, seed, dtype_policy()), objective="val_accuracy",
        max_epochs=max_epochs or d.kt_max_epochs, factor=3, hyperband_iterations=iterations, seed=seed,
        directory=str(directory), project_name=KT_PROJECT, overwrite=True)
    tuner.search(verbose=1)


def kt_best(data: str, directory: Path) -> tuple[dict | None, int]:
    """(The best completed Hyperband trial: id, score, epochs, its configuration of the space;
    the number of completed trials), read from the trial files of `directory` (a trial killed
    mid-write is skipped)."""
    import keras_tuner

    from pipeline.space import load_space

    space = load_space(DATASETS[data].space)
    done = []
    for path in sorted((directory / KT_PROJECT).glob("trial_*/trial.json")):
        try:
            trial = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if trial.get("status") == "COMPLETED" and trial.get("score") is not None:
            done.append(trial)
    if not done:
        return None, 0
    best = max(done, key=lambda t: t["score"])  # the first of equals: Python's max keeps the first
    hp = keras_tuner.HyperParameters.from_config(best["hyperparameters"])
    return {"trial_id": best["trial_id"], "score": best["score"], "epochs": hp.values.get("tuner/epochs"),
            "params": space.sample(Suggest(hp))}, len(done)


def write_warm_start(path: Path, space: Path, params: dict, name: str) -> None:
    """`params` as a one-configuration warm-start file of `space` (pipeline.warm_start's format)."""
    import yaml

    path.write_text(yaml.safe_dump({"description": "KerasTuner Hyperband's best trial (bench/budget_suite.py)",
                                    "search_space": str(space), "configurations": {f"kerastuner_{name}": params}},
                                   sort_keys=False))


# --- the suite: two jobs at once, then the report ------------------------------------------------

def run_suite(todo: list[Job], kt_share: float) -> None:
    """Run `todo`, two at once, each pinned to its own core; a kerastuner job waits for its search
    job when that is in `todo`."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    pending, running, lock = list(todo), set(), threading.Condition()

    def ready(job):
        search = Job(job.data, job.budget, "search", job.seed)
        return job.side != "kerastuner" or (search not in pending and search not in running)

    def worker(core):
        while True:
            with lock:
                while pending and not any(ready(j) for j in pending):
                    lock.wait()
                if not pending:
                    return
                job = next(j for j in pending if ready(j))
                pending.remove(job)
                running.add(job)
            print(f"{time.strftime('%H:%M:%S')} start {job.key} on core {core}", flush=True)
            try:
                rec = run_job(job, core, kt_share)
                print(f"{time.strftime('%H:%M:%S')} done  {job.key}: test accuracy {rec['test_accuracy']:.4f}, "
                      f"{rec['configurations']} configurations, wall {rec['wall_s']:.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001 (any failure: no record, the log kept, the suite goes on)
                print(f"{time.strftime('%H:%M:%S')} CRASHED {job.key}: {type(e).__name__}: {e}; no record, "
                      f"log {here() / (job.key + '.log')}", flush=True)
            with lock:
                running.discard(job)
                lock.notify_all()

    threads = [threading.Thread(target=worker, args=(core,)) for core in cores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def here() -> Path:
    """This machine's folder of records, named by its kind of CPU (amd-epyc-f25-m17): a rerun on
    another machine of the kind skips what is recorded, one of another kind measures afresh."""
    return RESULTS / kind_slug()


@functools.cache
def kind_slug() -> str:
    return kind_folder(machine())


def set_results(folder: Path) -> None:
    global RESULTS
    RESULTS = folder


def load_records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/*.json")) if p.parent.name != "runs"]


def mean_sd(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def machine_of(record: dict) -> str:
    """The kind of CPU a record ran on: its model name, family and model number."""
    return f"{record['cpu']} ({record.get('cpu_kind', 'family ?, model ?')})"


def summary(records: list[dict]) -> list[dict]:
    """Per data set, budget, machine kind and side: mean and sd over the seeds (figures of one kind
    of CPU are never averaged with another's: a budget buys different epochs on each)."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[r["data"], r["budget_s"], machine_of(r), r["side"]].append(r)
    order = {name: i for i, name in enumerate(DATASETS)}
    rows = []
    def side_order(side):  # the four sides first, then the variants and the cost-axis points by name
        return (SIDES.index(side), "") if side in SIDES else (len(SIDES), side)

    first = collections.defaultdict(lambda: math.inf)  # a machine's rows in the order they were measured
    for (data, budget, kind, _), rs in groups.items():
        first[data, budget, kind] = min(first[data, budget, kind], *(r["started"] for r in rs))
    for (data, budget, kind, side), rs in sorted(groups.items(), key=lambda g: (
            order.get(g[0][0], 99), g[0][1], first[g[0][:3]], side_order(g[0][3]))):
        acc, acc_sd = mean_sd([r["test_accuracy"] for r in rs])
        rows.append({"data": data, "budget": budget, "machine": kind, "side": side, "seeds": len(rs),
                     "acc": acc, "acc_sd": acc_sd,
                     "configurations": mean_sd([r["configurations"] for r in rs])[0],
                     "refit_epochs": mean_sd([r["refit_epochs"] for r in rs])[0],
                     "wall": mean_sd([r["wall_s"] for r in rs])[0],
                     "worst_overrun": max(r["wall_s"] / r["budget_s"] - 1 for r in rs)})
    return rows


def report(records: list[dict], plot: Path | None = None) -> str:
    """The table (markdown) of `records`, and their plot written to `plot` (RESULTS/budget_suite.png)."""
    rows = summary(records)
    plot = plot or RESULTS / "budget_suite.png"
    lines = ["| data set | budget | machine | side | seeds | test accuracy (mean ± sd) | configurations | refit epochs "
             "| wall / budget (worst overrun) |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['budget']} s | {r['machine']} | {r['side']} | {r['seeds']} | {r['acc']:.4f} ± "
                     f"{r['acc_sd']:.4f} | {r['configurations']:.1f} | {r['refit_epochs']:.1f} | "
                     f"{r['wall']:.0f} s / {r['budget']} ({r['worst_overrun']:+.1%}) |")
    if rows:
        draw([r for r in rows if r["data"] in README_DATA], plot)  # the README's picture: its data sets
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


README = ROOT / "README.md"
README_DATA = ("digits", "sample", "photos", "cifar10")  # sample-photos chooses a default: bench/README only
README_BLOCK = ("<!-- budget suite: written by `python bench/budget_suite.py --readme` from bench/results/budget/ -->",
                "<!-- /budget suite -->")


def readme_table(rows: list[dict]) -> str:
    """The README's table: per data set and budget, each side's test accuracy (mean ± sd over its
    seeds), and the best cost-axis point trained for the whole budget."""
    cells = collections.defaultdict(dict)
    for r in rows:
        value = f"{r['acc']:.4f}" + (f" ± {r['acc_sd']:.4f}" if r["seeds"] > 1 else "")
        cells[r["data"], r["budget"], r["machine"]][r["side"]] = (r["acc"], f"{value} ({r['seeds']})")
    lines = ["| data set | budget | machine | the search | the default, unsearched | random search "
             "| KerasTuner's Hyperband | best cost-axis point |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (data, budget, kind), sides in cells.items():
        if data not in README_DATA:
            continue
        fixed = max(((acc, f"{text}, {side.removeprefix(FIXED)}") for side, (acc, text) in sides.items()
                     if side.startswith(FIXED)), default=(0, "–"))[1]
        row = [sides[side][1] if side in sides else "–" for side in SIDES]
        lines.append(f"| {data} ({DATASETS[data].space.name}) | {budget} s | {kind} | {' | '.join(row)} | {fixed} |")
    return "\n".join(lines)


def readme_block(records: list[dict]) -> str:
    """What stands between README_BLOCK's markers: the table of `records`, seeds in brackets."""
    return "\n".join([README_BLOCK[0], readme_table(summary(records)), README_BLOCK[1]])


def write_readme(records: list[dict]) -> None:
    text = README.read_text()
    start, end = text.index(README_BLOCK[0]), text.index(README_BLOCK[1]) + len(README_BLOCK[1])
    README.write_text(text[:start] + readme_block(records) + text[end:])


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{**r, "data": f"{r['data']}, {r['machine']}"} for r in rows]  # a panel per data set and machine
    datas = list(dict.fromkeys(r["data"] for r in rows))
    sides = [*SIDES, *sorted({r["side"] for r in rows} - set(SIDES))]  # the cost-axis points last
    colours = dict(zip(sides, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, axes = plt.subplots(1, len(datas), figsize=(4.2 * len(datas), 3.8), squeeze=False)
    for ax, data in zip(axes[0], datas):
        for i, side in enumerate(sides):
            pts = sorted((r["budget"], r["acc"], r["acc_sd"]) for r in rows if r["data"] == data and r["side"] == side)
            if pts:
                x, y, sd = zip(*pts)
                shift = 1.02 ** (i - (len(sides) - 1) / 2)  # side by side at one budget, not on top of each other
                ax.errorbar([b * shift for b in x], y, yerr=sd, marker="o" if side in SIDES else "x", capsize=3,
                            label=side, color=colours[side], linestyle="-" if side in SIDES else ":")
        budgets = sorted({r["budget"] for r in rows if r["data"] == data})
        ax.set_xscale("log")
        ax.set_xlim(min(budgets) / 1.15, max(budgets) * 1.15)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_title(data, fontsize=9)
        ax.set_xlabel("budget (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean ± sd over seeds)")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comma(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["kerastuner-worker"]:  # the kerastuner side's search process
        p = argparse.ArgumentParser(prog="budget_suite.py kerastuner-worker")
        p.add_argument("--data", required=True, choices=DATASETS)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--directory", type=Path, required=True)
        p.add_argument("--max-epochs", type=int, default=0)
        a = p.parse_args(argv[1:])
        kerastuner_search(a.data, a.seed, a.directory, a.max_epochs or None)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=comma(str), default=(), help=f"comma list of {', '.join(DATASETS)}")
    parser.add_argument("--budgets", type=comma(int), default=(), help="comma list of seconds")
    parser.add_argument("--sides", type=comma(str), default=(),
                        help=f"comma list of {', '.join((*SIDES, *VARIANTS))}, or fixed-<name> "
                        "(bench/cost_axis.yaml's configuration <name> trained for the whole budget)")
    parser.add_argument("--seeds", type=comma(int), default=(), help="comma list")
    parser.add_argument("--kt-share", type=float, default=0.5,
                        help="the kerastuner side's search share of the budget where no search record gives it")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--report", action="store_true", help="only the table and the plot, from the records")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the records (and the plot)")
    parser.add_argument("--readme", action="store_true", help="with --report: also write the README's table")
    args = parser.parse_args(argv)
    set_results(args.results.resolve())
    unknown = [x for x in args.datasets if x not in DATASETS] + [x for x in args.sides
                                                                  if x not in (*SIDES, *VARIANTS) and not x.startswith(FIXED)]
    if unknown:
        parser.error(f"unknown data set or side: {', '.join(unknown)}")
    if not args.report:
        todo = jobs(args.datasets, args.budgets, args.sides, args.seeds)
        if args.dry_run:
            print("# each command runs pinned, `taskset -c 0` or `-c 1`, two at once, in its runs/<key>/ folder")
            for job in todo:
                state = "recorded, skipped" if job.record.exists() else "to run"
                print(f"# {job.key} ({state})")
                if job.side == "kerastuner":
                    print(shlex_join(kerastuner_command(job, job.folder)) + "   # killed at the end of its share")
                    print(shlex_join([sys.executable, "-m", "pipeline", *pipeline_command(
                        job, job.folder, budget=job.budget, warm_start=job.folder / "kerastuner_best.yaml")])
                          + f"   # --time-budget: {job.budget} less the seconds Hyperband used")
                else:
                    print(shlex_join([sys.executable, "-m", "pipeline", *pipeline_command(job, job.folder)]))
            return
        here().mkdir(parents=True, exist_ok=True)
        todo = [job for job in todo if not job.record.exists()]
        print(f"{len(todo)} jobs to run (recorded ones skipped)", flush=True)
        run_suite(todo, args.kt_share)
    print(report(load_records()))
    if args.readme:
        write_readme(load_records())


if __name__ == "__main__":
    main()

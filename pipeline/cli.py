"""Command line: `python -m pipeline <command> --name value` (dashes or underscores).

    python -m pipeline main      # search, then refit the best trial and score it on the test split
    python -m pipeline search    # search only; several workers may share one storage
    python -m pipeline refit     # refit and test the best trial of an existing study
    python -m pipeline recover   # fail and requeue the trials of dead workers, close their runs
    python -m pipeline space     # dry run: validate a space, print sampled models, no training
    python -m pipeline baselines # train and test the published models (search_spaces/baselines.yaml)

Options are the fields of `pipeline.config.Settings`. Bad input ends with a one-line
`error: ...` and exit code 2; Ctrl-C ends with exit code 130, SIGTERM with 143, both after
marking the running trial FAIL (its MLflow run KILLED) and saying how to resume.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import interrupts
from pipeline.config import Settings, fields
from pipeline.errors import PipelineError, mask

COMMANDS = {
    "main": "search, then refit the best configuration and score it on the test split",
    "search": "search only (run several against one storage to share a study)",
    "refit": "refit and test the best trial of an existing study",
    "recover": "fail and requeue the trials of dead workers and close their MLflow runs",
    "space": "dry run: validate the space, sample `samples` configurations, print their models (no training)",
    "baselines": "train each baseline configuration, score it on the test split, print a table",
}
SEARCHES = ("main", "search")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise PipelineError(message)


def parse(argv: list[str]) -> tuple[str, Settings]:
    parser = _Parser(prog="python -m pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command, help in COMMANDS.items():
        p = sub.add_parser(command, help=help, description=help)
        for name, typ, default, text in fields():
            flags = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
            p.add_argument(*flags, dest=name, type=typ, default=default, help=f"{text} (default: {default!r})")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    return command, Settings(**args)


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(command: str, settings: Settings, data=None) -> dict:
    """Run one command, log the study's plots and trials table to its parent run and print
    a summary; returns the test metrics for main/refit, {} for the others.

    `data` may be passed in (tests load it once); otherwise it is loaded from settings.
    Bad settings, space files, warm-start files and data fail here, before any study or run
    is touched.
    """
    from pipeline.data import load_dataset
    from pipeline.device import configure, set_threads
    from pipeline.space import load_space
    from pipeline.warm_start import enqueue, load_configurations

    space = load_space(settings.search_space)
    set_threads(settings.threads)  # before TensorFlow runs anything (resizing images does)
    if command == "recover":
        return _recover(settings, space)
    warm = {}
    if command in SEARCHES and settings.warm_start:
        warm = load_configurations(settings.warm_start, space, settings.only_names)[1]
    elif command in SEARCHES and settings.only:
        raise PipelineError(f"only={settings.only!r}: names configurations of warm_start, which is not set")
    if data is None:
        data = load_dataset(settings.dataset, settings.seed, settings.image_size)
    device = configure(settings)  # precision; names the device for the MLflow tags

    if command == "space":
        from pipeline.dry_run import dry_run

        dry_run(space, data, settings)
        return {}
    if command == "baselines":
        from pipeline.baselines import run_baselines

        run_baselines(settings, data)
        return {}

    from pipeline.pareto import log_front
    from pipeline.refit import refit_and_test
    from pipeline.report import log_study_report
    from pipeline.search import Objective, run_search
    from pipeline.study import join_study
    from pipeline.terminal import summary
    from pipeline.tracking import Tracker

    study, created = join_study(settings, space, create=command != "refit")
    if command in SEARCHES and settings.multi_objective and settings.pruner != "none":
        print(f"pruning is off: Optuna does not prune multi-objective studies (pruner={settings.pruner} ignored)")
    if warm:
        new = enqueue(study, warm)
        print(f"warm start: enqueued {', '.join(new)}" if new else "warm start: configurations already enqueued")
    # a worker that lost the race to create the study waits for the winner's parent run
    tracker = Tracker(study, settings, wait_for_parent=not created and command != "refit",
                      device=device)
    status = "FAILED"
    try:
        if command in SEARCHES:
            run_search(study, Objective(data, space, settings, tracker), settings)
        if command in SEARCHES and settings.multi_objective:
            log_front(study, settings, tracker)
        log_study_report(study, tracker.client, tracker.parent_run_id)
        metrics = refit_and_test(study, data, settings, tracker) if command in ("main", "refit") else {}
        print(summary(study, settings, tracker.parent_run_id, metrics))
        status = "FINISHED"
        return metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _recover(settings: Settings, space) -> dict:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.recover import recover
    from pipeline.study import open_study
    from pipeline.tracking import PARENT_ATTR

    study = open_study(settings, space, create=False)
    client = MlflowClient()
    try:  # the parent run names the experiment of the trial runs
        experiment_id = client.get_run(study.user_attrs[PARENT_ATTR]).info.experiment_id
    except (KeyError, MlflowException):
        experiment_id = None  # no parent in this tracking store: only the study is recovered
    failed, closed = recover(study, client, experiment_id)
    if not (failed or closed):
        print(f"recover: study {study.study_name!r}: no dead trials")
    return {}


def _resume_hint(command: str, settings: Settings) -> str:
    return (f"resume: python -m pipeline {command} --study-name {settings.study} --storage {mask(settings.storage)} "
            f"(and your other options), or the same `mlflow run` command")


def main(argv: list[str] | None = None) -> int:
    _quiet_tensorflow()
    with interrupts.caught():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    command = settings = None
    try:
        command, settings = parse(sys.argv[1:] if argv is None else argv)
        run(command, settings)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"interrupted by {name}: the running trial is marked FAIL (user attr fail_reason) and its "
              f"MLflow run KILLED; the study keeps every finished trial.", file=sys.stderr)
        if settings:
            print(_resume_hint(command, settings), file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    return 0

"""Command line: `python -m pipeline <command> --name value` (dashes or underscores).

    python -m pipeline main      # search, then refit the best trial and score it on the test split
    python -m pipeline search    # search only; several workers may share one storage
    python -m pipeline refit     # refit and test the best trial of an existing study
    python -m pipeline recover   # fail and requeue the trials of dead workers, close their runs
    python -m pipeline space     # dry run: validate a space, print sampled models, no training
    python -m pipeline baselines # train and test the published models (search_spaces/baselines.yaml)

Options are the fields of `pipeline.config.Settings`. Bad input ends with a one-line
`error: ...` and exit code 2; Ctrl-C ends with exit code 130, SIGTERM with 143, both after
marking the running trial FAIL (its MLflow run KILLED) and saying how to resume, in two lines.
A server that does not answer (the tracking server at the start, or either server for longer
than a worker waits: `pipeline.retries`) ends with a one-line error and exit code 75.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import interrupts, names, process
from pipeline.config import SEARCHES, Settings, fields
from pipeline.device import use_backend
from pipeline.errors import PipelineError
from pipeline.names import mask
from pipeline.quiet import quiet_console
from pipeline.retries import (NeverAnswered, Unreachable, log_retries, patient_tracking, server_unreachable,
                              tracking_unreachable, wait_for_server)

TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")

COMMANDS = {
    "main": "search, then refit the best configuration and score it on the test split",
    "search": "search only (run several against one storage to share a study)",
    "refit": "refit and test the best trial of an existing study",
    "recover": "fail and requeue the trials of dead workers and close their MLflow runs",
    "space": "dry run: validate the space, sample `samples` configurations, print their models (no training)",
    "baselines": "train each baseline configuration, score it on the test split, print a table",
}


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




def run(command: str, settings: Settings, data=None) -> dict:
    """Run one command; returns the test metrics for main/refit, {} for the others.

    `data` may be passed in (tests load it once); otherwise it is loaded from settings.
    Bad settings, space files, warm-start files and data fail here, before any study or run
    is touched, and so does an http(s) tracking server that does not answer.
    """
    from pipeline.data import check_dataset_name, check_splittable, load_dataset
    from pipeline.device import configure, set_threads
    from pipeline.space import load_space
    from pipeline.warm_start import load_configurations

    space = load_space(settings.search_space) if command != "baselines" else None  # baselines name their own
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    check_tracking_uri(uri)
    if command != "space" and urlsplit(uri).scheme in ("http", "https"):
        wait_for_server(uri)  # NeverAnswered within START_PATIENCE s, before anything is made
    if data is None and command != "recover":
        check_dataset_name(settings.dataset)  # before the backend's import, which takes seconds
    if command in SEARCHES and settings.cluster:  # distributed is imported only here
        from pipeline.cluster.submit import reach

        reach(settings.cluster)
    quiet_console()
    log_retries()
    # before the backend runs anything (resizing images does); with `workers` or `cluster`, `threads`
    # counts per worker, and this process (the probe, `main`'s refit) keeps every core
    set_threads(settings.threads if settings.workers <= 1 and not settings.cluster else 0)
    if command == "recover":
        process.libraries_loaded()
        return _recover(settings, space)
    warm = {}
    if command in SEARCHES and settings.warm_start:
        warm = load_configurations(settings.warm_start, space, settings.only_names)[1]
    elif command in SEARCHES and settings.only:
        raise PipelineError(f"only={settings.only!r}: names configurations of warm_start, which is not set")
    if data is None:
        data = load_dataset(settings.dataset, settings.seed, settings.image_size)
    if command in (*SEARCHES, "baselines"):
        check_splittable(data, settings.cv_folds if command in SEARCHES else 1)
    from pipeline.data.lines import imbalance_line, splits_line

    for line in (splits_line(data, settings.replace(cv_folds=settings.cv_folds if command in SEARCHES else 1)),
                 imbalance_line(data, settings)):
        if line:
            print(line, flush=True)
    if command in SEARCHES:
        print(settings.space_line, flush=True)
    device = configure(settings)  # precision; names the device for the MLflow tags
    from pipeline.core import run_study

    process.libraries_loaded()
    if command == "space":
        from pipeline.dry_run import dry_run

        dry_run(space, data, settings)
        return {}
    if command == "baselines":
        from pipeline.baselines import run_baselines

        run_baselines(settings, data, device)
        return {}
    return run_study(command, settings, data, space, warm=warm, device=device).metrics


def _recover(settings: Settings, space) -> dict:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.recover import recover, settle
    from pipeline.study import open_study

    study = open_study(settings, space, create=False)
    client = MlflowClient()
    try:  # the parent run names the experiment of the trial runs
        experiment_id = client.get_run(study.user_attrs[names.PARENT_RUN]).info.experiment_id
    except (KeyError, MlflowException):
        experiment_id = None  # no parent in this tracking store: only the study is recovered
    failed, closed = recover(study, client, experiment_id)
    failed += settle(study, client, experiment_id, settings)
    if not (failed or closed):
        print(f"recover: study {study.study_name!r}: no dead trials")
    return {}


def check_tracking_uri(uri: str) -> None:
    """MLFLOW_TRACKING_URI as a one-line error where it cannot work: an unknown scheme, or a
    SQLite file whose folder is missing (MLflow would fail deep inside, with a traceback)."""
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise PipelineError(f"MLFLOW_TRACKING_URI={mask(uri)}: unknown scheme {scheme!r} (expected a folder, "
                            "sqlite:///file.db, http(s)://server or a database URL)")
    if scheme == "sqlite":
        folder = Path(uri.split("///", 1)[-1]).parent
        if not folder.is_dir():
            raise PipelineError(f"MLFLOW_TRACKING_URI={mask(uri)}: folder {folder} does not exist")


def _resume_hint(command: str, settings: Settings) -> str:
    return (f"resume: python -m pipeline {command} --study-name {settings.study} --storage {mask(settings.storage)} "
            f"(and your other options), or the same `mlflow run` command")


def command_line() -> int:
    """`python -m pipeline` and the `cnn-search` command: `main` as the whole process."""
    return process.run(main)


def main(argv: list[str] | None = None) -> int:
    with interrupts.caught():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    command = settings = None
    try:
        command, settings = parse(sys.argv[1:] if argv is None else argv)
        use_backend(settings.keras_backend)  # before Keras is imported
        with patient_tracking(settings.grace_period - settings.heartbeat_interval):  # PatientRDBStorage's patience
            run(command, settings)
    except NeverAnswered as e:
        print(f"error: {e}", file=sys.stderr)
        return 75
    except Unreachable as e:
        print(f"error: {e}; the running trial fails, the study keeps every finished trial", file=sys.stderr)
        if settings:
            print(_resume_hint(command, settings), file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not server_unreachable(e):
            raise
        print(f"error: {tracking_unreachable(os.environ.get('MLFLOW_TRACKING_URI', ''))}", file=sys.stderr)
        return 75
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"interrupted by {name}: the running trial is marked FAIL (user attr fail_reason) and its "
              f"MLflow run KILLED; the study keeps every finished trial.", file=sys.stderr)
        if settings:
            print(_resume_hint(command, settings), file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    return 0

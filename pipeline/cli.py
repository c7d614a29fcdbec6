"""Command line: `python -m pipeline <command> --name value` (dashes or underscores).

    python -m pipeline main      # search, then refit the best trial and score it on the test split
    python -m pipeline search    # search only; several workers may share one storage
    python -m pipeline refit     # refit and test the best trial of an existing study

Options are the fields of `pipeline.config.Settings`. Bad input ends with a one-line
`error: ...` and exit code 2; Ctrl-C or SIGTERM with exit code 130 and how to resume.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pipeline.config import Settings, fields
from pipeline.errors import PipelineError

COMMANDS = {
    "main": "search, then refit the best configuration and score it on the test split",
    "search": "search only (run several against one storage to share a study)",
    "refit": "refit and test the best trial of an existing study",
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


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(command: str, settings: Settings, data=None) -> dict:
    """Run one command; returns the test metrics for main/refit, {} for search.

    `data` may be passed in (tests load it once); otherwise it is loaded from settings.
    Bad settings, space files and data fail here, before any study or run is touched.
    """
    from pipeline.data import load_dataset
    from pipeline.device import configure, set_threads
    from pipeline.space import load_space

    space = load_space(settings.search_space)
    set_threads(settings.threads)  # before TensorFlow runs anything (resizing images does)
    if data is None:
        data = load_dataset(settings.dataset, settings.seed, settings.image_size)
    device = configure(settings)  # precision; names the device for the MLflow tags

    from pipeline.refit import refit_and_test
    from pipeline.search import Objective, run_search
    from pipeline.study import open_study
    from pipeline.tracking import Tracker

    study = open_study(settings, space, create=command != "refit")
    tracker = Tracker(study, settings, device=device)
    status = "FAILED"
    try:
        if command in ("main", "search"):
            run_search(study, Objective(data, space, settings, tracker), settings)
        metrics = refit_and_test(study, data, settings, tracker) if command in ("main", "refit") else {}
        status = "FINISHED"
        return metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def main(argv: list[str] | None = None) -> int:
    _quiet_tensorflow()
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        command, settings = parse(sys.argv[1:] if argv is None else argv)
        metrics = run(command, settings)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: the running trial is marked FAIL and its MLflow run KILLED; "
            "run the same command again to resume the study",
            file=sys.stderr,
        )
        return 130
    for k, v in metrics.items():
        if not k.startswith(("test_precision_", "test_recall_", "test_f1_")) or k.endswith("_macro"):
            print(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    return 0

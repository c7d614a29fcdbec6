"""The command line as a user meets it: bad input gives a one-line error, exit code 2,
no traceback, and leaves what was recorded before intact."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import weakref

import optuna
import pytest

from pipeline import interrupts
from pipeline.cli import main, parse
from pipeline.train import train, validation_splits


def pipeline(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_options_accept_dashes_and_underscores():
    command, s = parse(["search", "--n-trials", "5", "--cv_folds", "3", "--study-name", "x"])
    assert (command, s.n_trials, s.cv_folds, s.study) == ("search", 5, 3, "x")
    assert parse(["main"])[1].study == "digits-seed"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--n-trials", "0"], "n_trials=0: must be >= 1"),
        (["--epochs", "0"], "epochs=0: must be >= 1"),
        (["--cv-folds", "0"], "cv_folds=0: must be >= 1"),
        (["--pruner", "sometimes"], "pruner='sometimes'"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
        (["--dataset", "nowhere"], "dataset='nowhere': not a known dataset"),
        (["--search-space", "search_spaces/none.yaml"], "search_spaces/none.yaml: search-space file not found"),
        (["--metric", "val_f1"], "metric='val_f1': must be one of val_accuracy, val_loss"),
        pytest.param(["--backend", "torch"], "backend='torch': the torch package is not installed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, fragment):
    result = pipeline("main", "--storage", f"sqlite:///{tmp_path}/o.db", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


BAD_FILES = {"malformed.yaml": "x: [\n", "list.yaml": "- a\n- b\n",
             "configurations.yaml": "search_space: seed.yaml\nconfigurations: [1, 2]\n"}


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        # file formats: search space, warm start, baselines
        (["--search-space", "{tmp}/malformed.yaml"], {}, "malformed.yaml: cannot read search space: "),
        (["--search-space", "{tmp}/list.yaml"], {}, "list.yaml: a search space must be a YAML mapping"),
        (["--warm-start", "{tmp}/malformed.yaml"], {}, "malformed.yaml: cannot read configurations: "),
        (["--warm-start", "{tmp}/configurations.yaml"], {}, "key 'configurations' must map names to params"),
        (["--warm-start", "{tmp}/none.yaml"], {}, "none.yaml: configurations file not found"),
        # each storage URL form
        (["--storage", "sqlite://o.db"], {}, "storage=sqlite://o.db: cannot open (ArgumentError: Invalid SQLite URL"),
        (["--storage", "sqlite:///{tmp}/no/o.db"], {}, "unable to open database file"),
        (["--storage", "journal:///{tmp}/no/s.journal"], {}, "/no does not exist"),
        (["--storage", "redis://localhost"], {}, "storage=redis://localhost: expected sqlite:///..., journal:///..."),
        (["--storage", "postgresql://u:hunter2@127.0.0.1:1/db"], {}, "storage=postgresql://u:***@127.0.0.1:1/db: cannot open"),
        (["--storage", "mysql://u:hunter2@127.0.0.1:1/db"], {}, "storage=mysql://u:***@127.0.0.1:1/db: cannot open"),
        # the tracking store
        ([], {"MLFLOW_TRACKING_URI": "foo://x"}, "MLFLOW_TRACKING_URI=foo://x: unknown scheme 'foo'"),
        ([], {"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/no/mlflow.db"}, "/no does not exist"),
    ],
    ids=["space-yaml", "space-not-mapping", "warm-start-yaml", "warm-start-shape", "warm-start-missing",
         "sqlite-two-slashes", "sqlite-missing-folder", "journal-missing-folder", "unknown-scheme",
         "postgresql-unreachable", "mysql-unreachable", "tracking-scheme", "tracking-sqlite-folder"],
)
def test_each_kind_of_bad_input_is_one_line_and_exit_2(tmp_path, tracking_uri, monkeypatch, capsys, args, env, fragment):
    """File formats, storage URL forms and the tracking store, in this process: a traceback
    would be an exception out of `main`."""
    from pipeline.cli import main

    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    args = [a.format(tmp=tmp_path) for a in args]
    if "--storage" not in args:
        args += ["--storage", f"sqlite:///{tmp_path}/o.db"]
    code = main(["search", "--n-trials", "1", "--epochs", "1", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err and "hunter2" not in err


def test_bad_input_leaves_an_existing_study_intact(tmp_path, tracking_uri, capsys):
    """In this process (a traceback would be an exception out of `main`): a study, then bad
    input against it, each a one-line error and exit 2, the study's trials untouched."""
    from pipeline.cli import main

    storage = f"sqlite:///{tmp_path}/o.db"
    common = ["--storage", storage, "--study-name", "kept", "--epochs", "1"]
    assert main(["search", *common, "--n-trials", "2"]) == 0
    before = [(t.number, t.state, t.value) for t in optuna.load_study(study_name="kept", storage=storage).trials]
    broken = tmp_path / "broken.yaml"
    broken.write_text("depth: {low: 3, high: 1}\n")
    capsys.readouterr()
    for bad in (["--search-space", str(broken)], ["--dataset", str(tmp_path / "missing")], ["--n-trials", "0"]):
        code, err = main(["main", *common, *bad]), capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    code, err = main(["main", *common, "--direction", "minimize"]), capsys.readouterr().err
    assert code == 2 and "was made with direction='maximize'" in err
    after = [(t.number, t.state, t.value) for t in optuna.load_study(study_name="kept", storage=storage).trials]
    assert after == before and len(after) == 2


def test_refit_of_a_missing_study_is_a_clear_error(tmp_path, tracking_uri, capsys):
    assert main(["refit", "--storage", f"sqlite:///{tmp_path}/o.db", "--study-name", "ghost"]) == 2
    assert "study_name='ghost': no such study" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_lost_in_a_finalizer_still_stops_training(digits, sig, capfd, monkeypatch):
    """The handler may run inside a weakref callback of the garbage collector, where Python
    drops its KeyboardInterrupt (and prints no "Exception ignored" traceback for it); the next
    batch of a fit raises it again."""

    class Model:
        pass

    model = Model()
    ref = weakref.ref(model, lambda _: signal.raise_signal(sig))  # the handler raises in the callback
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's, not pytest's: it prints
    split = validation_splits(digits.x_train, digits.y_train, 1, 0.2, seed=0)[0]
    params = {"depth": 1, "conv1_filters": 4, "conv1_kernel_size": 3, "conv1_pool_size": 2, "dense_units": 8}
    with interrupts.caught(), pytest.raises(KeyboardInterrupt, match=f"^{sig.name}$"):
        del model
        assert ref() is None  # the interrupt is gone: training would go on for 1000 epochs
        train(params, split, digits.input_shape, digits.n_classes, epochs=1000, patience=1000)
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err


def test_an_error_raised_over_a_caught_signal_ends_the_trial_as_interrupted(settings):
    """TensorFlow's device scope, exited by the KeyboardInterrupt, raises its own RuntimeError over
    it (the Dask drill saw it): the trial still ends FAIL with fail_reason "interrupted by
    SIGTERM", its run KILLED, and the process goes on as interrupted."""
    from mlflow.tracking import MlflowClient

    from pipeline import names
    from pipeline.space import load_space
    from pipeline.study import join_study
    from pipeline.tracking import Tracker

    study, _ = join_study(settings, load_space(settings.search_space))
    tracker = Tracker(settings, study)
    trial = study.ask()
    with interrupts.caught(), pytest.raises(KeyboardInterrupt, match="^SIGTERM$"):
        with tracker.trial_run(trial, {"depth": 1}):
            try:
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                raise RuntimeError("Exiting device scope without proper scope nesting") from None
    tracker.finish("KILLED")
    assert trial.user_attrs[names.FAIL_REASON] == "interrupted by SIGTERM"
    run = MlflowClient().get_run(trial.user_attrs[names.MLFLOW_RUN_ID])
    assert run.info.status == "KILLED" and run.data.tags["pipeline.fail_reason"] == "interrupted by SIGTERM"


def test_the_resume_hint_needs_neither_mlflow_nor_tensorflow():
    """Ctrl-C may come while they are half imported, and importing them again then fails."""
    code = ("import sys; from pipeline.cli import _resume_hint, parse; print(_resume_hint(*parse(['search']))); "
            "print({'mlflow', 'tensorflow', 'keras', 'optuna'} & set(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("resume: python -m pipeline search") and out.endswith("set()\n"), out


@pytest.mark.parametrize("end, code", [("return 3", 3), ("raise SystemExit(0)", 0), ("raise ValueError('x')", 1)])
def test_a_pipeline_process_ends_with_its_code_after_every_exit_handler(end, code):
    """`pipeline.process.run`: the collector is back on once the command returns, and the
    process ends after the libraries' exit handlers with the command's exit code, its buffered
    output written, whether the command returns, exits or raises."""
    script = f"""
import atexit, gc, sys
from pipeline import process
def main():
    atexit.register(lambda: print("a library's exit handler ran", flush=True))
    print("buffered", end="")
    {end}
try:
    sys.exit(process.run(main))
finally:
    print(" collector on" if gc.isenabled() else " collector off", end="")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert done.stdout == "buffered collector ona library's exit handler ran\n", done.stdout
    assert ("ValueError: x" in done.stderr) == (code == 1)

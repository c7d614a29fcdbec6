"""Optuna study: storage from a URL, seeded TPE sampler, pruner, a guard against reusing a
study with a different dataset, search space, objectives or direction, and the study-wide
deadline that `timeout` sets.

Storages: `sqlite:///file.db` (one worker), `journal:///abs/path.journal` (several workers
on one machine), `postgresql://...` / `mysql://...` (workers on many machines). RDB
storages get heartbeats, so a killed worker's trial turns FAIL and is retried.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

from pipeline.errors import PipelineError
from pipeline.tracking import mask

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats (RDB storages)
GRACE_PERIOD = 30  # seconds without a heartbeat before a trial counts as dead
MAX_RETRY = 2  # times a trial of a dead worker is retried
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
DEADLINE_ATTR = "deadline"  # study user attr: epoch seconds after which no trial starts


def make_storage(url: str):
    """An Optuna storage for `url`; errors mask the password."""
    if url.startswith("journal://"):
        path = Path(url.removeprefix("journal://"))
        if not path.parent.is_dir():
            raise PipelineError(f"storage={url}: folder {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise PipelineError(f"storage={mask(url)}: expected sqlite:///..., journal:///..., postgresql://... or mysql://...")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
    except Exception as e:
        raise PipelineError(f"storage={mask(url)}: cannot open ({type(e).__name__}: {mask(str(e).splitlines()[0])})") from None


def make_pruner(name: str, epochs: int, folds: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs * folds)
    return optuna.pruners.NopPruner()


def identity(settings, space) -> dict:
    """What a study is: reusing it with other values would mix incomparable trials."""
    return {"dataset": settings.dataset, "search_space": space.digest, "metric": settings.metric,
            "direction": settings.direction, "cv_folds": settings.cv_folds,
            "objectives": ",".join(settings.objective_names)}


def open_study(settings, space, *, create: bool = True) -> optuna.Study:
    """Create the study or load it (`create=False`: it must exist); refuse to reuse it
    with a different identity (dataset, space, metric, direction, folds, objectives).
    Several objectives make a multi-objective study, without pruning (Optuna has none for it)."""
    storage = make_storage(settings.storage)
    name = settings.study
    if create:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            load_if_exists=True,
            directions=settings.directions,
            sampler=optuna.samplers.TPESampler(seed=settings.seed),
            pruner=make_pruner(settings.pruner if settings.pruning else "none", settings.epochs, settings.cv_folds),
        )
    else:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise PipelineError(f"study_name={name!r}: no such study in {mask(settings.storage)}") from None
    if len(study.directions) != len(settings.directions):
        raise PipelineError(f"study_name={name!r} has {len(study.directions)} objective(s), not "
                            f"{len(settings.directions)} (objectives={settings.objectives!r}); use another study_name")
    wanted = identity(settings, space)
    known = {k: study.user_attrs[k] for k in wanted if k in study.user_attrs}
    clash = {k: (v, wanted[k]) for k, v in known.items() if v != wanted[k]}
    if clash:
        k, (old, new) = next(iter(clash.items()))
        raise PipelineError(f"study_name={name!r} was made with {k}={old!r}, not {new!r}; use another study_name")
    for k, v in wanted.items():
        if k not in known:
            study.set_user_attr(k, v)
    return study


def counted_trials(study: optuna.Study) -> int:
    """Trials that use up the budget: complete or pruned (failed ones are retried)."""
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def deadline(study: optuna.Study, timeout: int) -> float | None:
    """The study-wide deadline (epoch seconds) for `timeout` > 0: set by the first worker as
    now + timeout, stored in the study, and read back by every later worker and resume."""
    if not timeout:
        return None
    if DEADLINE_ATTR not in study.user_attrs:
        study.set_user_attr(DEADLINE_ATTR, time.time() + timeout)
    return float(study.user_attrs[DEADLINE_ATTR])

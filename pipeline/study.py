"""Optuna study: storage from a URL, seeded TPE sampler, pruner, a guard against reusing a
study with a different dataset, search space, objectives or direction, and the study-wide
deadline that `timeout` sets.

Storages: `sqlite:///file.db` (one worker), `journal:///abs/path.journal` (several workers
on one machine), `postgresql://...` / `mysql://...` (workers on many machines). RDB
storages get heartbeats, so a killed worker's trial turns FAIL and is retried; journal
storages are recovered by `pipeline.recover`. A database outage shorter than grace_period -
heartbeat_interval (20 s by default) is ridden out (`PatientRDBStorage`). `$VAR` / `${VAR}`
in a URL are expanded from the environment, so a password need not appear on a command line
or in MLflow params.

Several workers may start on a fresh study at once: the storage lets exactly one create it
(`join_study` says which), and the sampler is reseeded per trial number, so workers that
share a `seed` still draw different configurations.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

from pipeline import names
from pipeline.budget.prior import PriorSampler
from pipeline.budget.rungs import RungSampler
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.names import mask
from pipeline.retries import patient

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats (RDB storages)
GRACE_PERIOD = 30  # seconds without a heartbeat before a trial counts as dead
MAX_RETRY = 2  # times a trial of a dead worker is retried
TPE_STARTUP = 5  # random trials before TPE models the study (Optuna's default, 10, is most of a CNN budget)
PRUNE_AFTER = 2  # epochs every trial trains before the median pruner may stop it (slow starters survive)
DRIVERS = {"postgresql://": "postgresql+psycopg2://", "mysql://": "mysql+pymysql://"}  # the pinned ones
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class PatientRDBStorage(RDBStorage):
    """RDBStorage that rides out a short database outage (a restart): every call that cannot
    reach the database is retried for `patience` seconds (`pipeline.retries`), a heartbeat
    that cannot be recorded is skipped."""

    @property
    def patience(self) -> float:
        """grace_period - heartbeat_interval: a worker that waited longer could find its trial taken for dead."""
        return self.grace_period - self.heartbeat_interval


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
              "create_new_trial", "set_trial_param", "get_trial_param", "set_trial_state_values",
              "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
              "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "get_best_trial",
              # what Optuna's cache and heartbeat call directly
              "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials", "_get_stale_trial_ids"):
    setattr(PatientRDBStorage, _name, patient(getattr(RDBStorage, _name)))
PatientRDBStorage.record_heartbeat = patient(RDBStorage.record_heartbeat, skip=True)


def make_storage(url: str, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD):
    """An Optuna storage for `url`; errors mask the password."""
    given, url = url, os.path.expandvars(url)
    if url.startswith("journal://"):
        path = Path(url.removeprefix("journal://"))
        if not path.parent.is_dir():
            raise PipelineError(f"storage={given}: folder {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise PipelineError(f"storage={mask(given)}: expected sqlite:///..., journal:///..., postgresql://... or mysql://...")
    for plain, with_driver in DRIVERS.items():
        if url.startswith(plain):
            url = with_driver + url.removeprefix(plain)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return PatientRDBStorage(
                    url,
                    # a pooled connection is checked before use: after a database restart a worker
                    # reconnects instead of failing on a connection the server has closed
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
        except Exception as e:
            # Workers opening a fresh database at once race to create Optuna's tables: try again.
            if attempt < 4 and (isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)):
                time.sleep(1 + attempt)
                continue
            first_line = mask(str(e).splitlines()[0])
            raise PipelineError(f"storage={mask(given)}: cannot open ({type(e).__name__}: {first_line})") from None


def make_pruner(name: str, epochs: int, folds: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=PRUNE_AFTER)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs * folds)
    return optuna.pruners.NopPruner()


def identity(settings: Settings, space) -> dict:
    """What a study is: reusing it with other values would mix incomparable trials."""
    return {"dataset": settings.dataset, "search_space": space.digest, "metric": settings.metric,
            "direction": settings.direction, "cv_folds": settings.cv_folds,
            "objectives": ",".join(settings.objective_names)}


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE reseeded for every trial with `seed + trial.number`.

    Trial numbers are unique within a study, so workers started with the same `seed` never
    draw the same random configurations, while one worker alone stays reproducible: trial n
    always starts from the same random state.
    """

    def __init__(self, seed: int, startup: int = TPE_STARTUP):
        self.seed, self.startup = seed, startup
        self._tpe = self._make(seed, startup)

    @staticmethod
    def _make(seed: int, startup: int) -> optuna.samplers.TPESampler:
        # multivariate + group: one joint model per set of params that occur together (a
        # space's later blocks exist only at some depths); constant_liar: workers that sample
        # at once see each other's running trials and spread out.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                              constant_liar=True)

    def before_trial(self, study, trial):
        self._tpe = self._make(self.seed + trial.number, self.startup)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._tpe.after_trial(study, trial, state, values)


def make_sampler(name: str, seed: int, default: dict | None = None) -> RungSampler:
    """`tpe` (the default), with the space's `default` as its prior where it has one
    (pipeline.budget.prior), or `random`: the tutorial's randomized search, for comparison; in a
    study with rungs either learns from one rung at a time (`pipeline.budget.rungs`)."""
    if name == "random":
        return RungSampler(optuna.samplers.RandomSampler(seed=seed), TPE_STARTUP)
    return RungSampler(PriorSampler(TrialSeededSampler(seed), default, seed), TPE_STARTUP)


def set_startup(study: optuna.Study, startup: int) -> None:
    """Random evaluations before TPE models the study (or, with rungs, a rung): sized to the
    budget's rung-0 evaluations by the planner (and kept in the study, `tpe_startup`, for every
    worker)."""
    sampler = study.sampler
    sampler.startup = startup
    if isinstance(sampler.base, PriorSampler):
        sampler.base.base.startup = startup


def this_process() -> str:
    """`host:pid`, as a study records the process that created it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def join_study(settings: Settings, space, *, create: bool = True) -> tuple[optuna.Study, bool]:
    """Create the study or load it (`create=False`: it must exist) and say whether this
    process created it (now or earlier, e.g. to enqueue trials first): of several workers
    starting at once exactly one did, and the others wait for its parent run. Refuse to reuse a study
    with a different identity (dataset, space, metric, direction, folds, objectives).
    Several objectives make a multi-objective study, without pruning (Optuna has none for it)."""
    storage = make_storage(settings.storage, settings.heartbeat_interval, settings.grace_period)
    name = settings.study
    pruner = make_pruner(settings.pruner if settings.pruning else "none", settings.epochs, settings.cv_folds)
    kwargs = dict(study_name=name, storage=storage, sampler=make_sampler(settings.sampler, settings.seed, space.default),
                  pruner=pruner)
    created = False
    try:
        if create:
            study, created = optuna.create_study(directions=settings.directions, **kwargs), True
            study.set_user_attr(names.CREATOR, this_process())
        else:
            study = optuna.load_study(**kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
    except KeyError:
        raise PipelineError(f"study_name={name!r}: no such study in {mask(settings.storage)}") from None
    if len(study.directions) != len(settings.directions):
        raise PipelineError(f"study_name={name!r} has {len(study.directions)} objective(s), not "
                            f"{len(settings.directions)} (objectives={settings.objectives!r}); use another study_name")
    wanted = identity(settings, space)
    known = {k: study.user_attrs[k] for k in wanted if k in study.user_attrs}
    known.setdefault("direction", study.directions[0].name.lower())
    clash = {k: (v, wanted[k]) for k, v in known.items() if v != wanted[k]}
    if clash:
        k, (old, new) = next(iter(clash.items()))
        raise PipelineError(f"study_name={name!r} was made with {k}={old!r}, not {new!r}; use another study_name")
    for k, v in wanted.items():
        if k not in study.user_attrs:
            study.set_user_attr(k, v)
    return study, created or study.user_attrs.get(names.CREATOR) == this_process()


def open_study(settings: Settings, space, *, create: bool = True) -> optuna.Study:
    """`join_study` without the flag."""
    return join_study(settings, space, create=create)[0]


def counted_trials(study: optuna.Study) -> int:
    """Trials that use up the budget: complete or pruned (failed ones are retried)."""
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def deadline(study: optuna.Study, timeout: int) -> float | None:
    """The study-wide deadline (epoch seconds) for `timeout` > 0: set by the first worker as
    now + timeout, stored in the study, and read back by every later worker and resume."""
    if not timeout:
        return None
    if names.DEADLINE not in study.user_attrs:
        study.set_user_attr(names.DEADLINE, time.time() + timeout)
    return float(study.user_attrs[names.DEADLINE])

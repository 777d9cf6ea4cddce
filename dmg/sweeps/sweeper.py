"""Resumable, failure-tolerant Optuna searches as Hydra multiruns (``hydra/sweeper=dmg_optuna``, docs/sweeps.md).

hydra-optuna-sweeper 1.3 asks for ``n_trials`` new trials on every call, leaves the trials of a killed process
RUNNING forever, ends the whole sweep when one job fails or returns NaN (``max_failure_rate`` counts per batch) and
knows neither conditional parameters nor ``glob(*)``. ``ResumableOptuna`` keeps its parsing of the search space
and replaces its batch loop:

- ``n_trials`` is the size of the whole study: rerunning the command, or a second worker on the same storage,
  runs only the trials still missing (finished trials are never rerun), and a worker ends only when the study is
  complete, waiting for trials that other live processes run;
- a trial whose process died is queued again with the same parameters: at once when it ran on this host, after
  its heartbeat has been silent for the grace period when it ran on another; its run then continues from its
  checkpoint (the run's config hash names the trial it stands for). A job in a process of its own (a SLURM job)
  beats for its trial too, so that a trial whose sweeper died is left to the job while it trains (dmg/sweeps/job.py);
- a trial that fails because of its own config or numerics (a ``UserError``, a NaN/inf objective) is recorded as
  FAIL with the reason in its ``failure`` user attribute, and the sweep goes on (it stops after
  ``max_consecutive_failures`` in a row); any other error (a store, a disk, a bug) queues the trial again and
  stops the sweep with one line saying what broke: it never consumes the study (dmg/sweeps/trials.py);
- each job gets ``<trial_key>={study, number, origin, params}`` so that its MLflow run can be tagged;
- ``conditional_params`` are sampled only when other parameters take given values (``mask.val`` for
  ``mask=scalar``) and ``group=glob(*)`` searches over every option of a config group.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import Trial, TrialState

from dmg.errors import BadValue, UserError, check_count, check_number
from dmg.runs.stores import check_store_uri, create_sqlite_atomically, install_log_masking, masked, store_lock
from dmg.runs.windows import window
from dmg.sweeps.job import sweep_environment
from dmg.sweeps.trials import (
    COMPLETE,
    JOB_ATTR,
    PROCESS_ATTR,
    RETRY,
    TAKEN,
    claim,
    finished,
    heartbeat,
    origin,
    record,
    requeue_abandoned,
    requeue_stopped,
    running,
    uncached,
)

log = logging.getLogger(__name__)

Condition = tuple[dict[str, Any], BaseDistribution]
WAIT_POLL_SECONDS = 5  # how often a worker waiting for others' trials looks at the study
OPTIONS = {"n_trials": 1, "n_jobs": 1, "heartbeat_interval": 1, "max_consecutive_failures": 1}


class SweepFailed(UserError):
    """Too many trials in a row failed because of their configs: the search space or the config is probably broken."""


class SweepStopped(UserError):
    """A trial was stopped by something outside its config (a store, a disk, a bug); it is queued again."""


def check_options(sweeper: DictConfig | Mapping) -> None:
    """One-line errors for sweeper options out of range, before anything is written."""
    for name, least in OPTIONS.items():
        check_count(f"hydra.sweeper.{name}", sweeper.get(name), least)
    if sweeper.get("grace_period") is not None:
        check_number("hydra.sweeper.grace_period", sweeper.get("grace_period"), above=0)
    if str(sweeper.get("direction")) not in ("maximize", "minimize"):
        raise BadValue("hydra.sweeper.direction", "maximize or minimize", sweeper.get("direction"))
    if not isinstance(sweeper.get("storage"), str):
        expected = "a database URL such as sqlite:///optuna.db (a study in memory is neither shared nor resumed)"
        raise BadValue("hydra.sweeper.storage", expected, sweeper.get("storage"))
    check_store_uri(sweeper.get("storage"), "hydra.sweeper.storage")


class ResumableOptuna(OptunaSweeperImpl):
    """The Optuna sweeper behind ``hydra/sweeper=dmg_optuna``: one study, resumable, shared, failure-tolerant."""

    def __init__(
        self,
        sampler: Any,
        direction: str,
        storage: str | None,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        params: Mapping[str, str] | None = None,
        conditional_params: Mapping[str, Mapping] | None = None,
        custom_search_space: str | None = None,
        heartbeat_interval: int = 60,
        grace_period: int | None = None,
        max_consecutive_failures: int = 5,
        trial_key: str | None = "tracking.trial",
        results_file: str = "optimization_results.yaml",
    ) -> None:
        check_options(locals())
        install_log_masking()  # Hydra's launch lines hold the storage and tracking URLs
        super().__init__(
            sampler, direction, storage, study_name, n_trials, n_jobs, 1.0, None, custom_search_space, params
        )
        if isinstance(sampler, functools.partial):  # the grid sampler, built from the search space
            raise UserError("for a grid use Hydra's basic sweeper (python launch.py -m name=a,b,c), not dmg_optuna")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 2 * heartbeat_interval
        self.max_consecutive_failures = max_consecutive_failures
        self.trial_key = trial_key
        self.results_file = Path(results_file)
        self.awaited = ""
        self.searched: list[str] = []  # the search space's names, once the sweep has parsed it
        self.conditions = {name: parse_condition(name, spec) for name, spec in (conditional_params or {}).items()}
        self.custom_search_space_extender = extend_with(self.conditions, self.custom_search_space_extender)

    def sweep(self, arguments: list[str]) -> None:
        """Run trials until the study holds ``n_trials`` finished ones; write the best trial to ``results_file``."""
        space, fixed = self.parse_search_space(arguments)
        self.searched = [*space, *self.conditions]
        study = self.open_study(self.searched)
        failures_in_a_row = 0
        with sweep_environment(self.storage, self.heartbeat_interval, self.trial_key):  # for jobs that beat
            while finished(study.get_trials(deepcopy=False), self.searched) < self.n_trials:
                trials = self.start_trials(study)
                if not trials:
                    self.wait_for_others(study)
                    continue
                returns = self.run_trials(study, trials, space, fixed)
                outcomes = [record(study, trial, job) for trial, job in zip(trials, returns)]
                failures_in_a_row = self.check_outcomes(study.study_name, outcomes, failures_in_a_row)
        save_results(study, self.results_file)

    def check_outcomes(self, study_name: str, outcomes: list[str], failures_in_a_row: int) -> int:
        """Stop the sweep after a problem outside the trials' configs, or after too many failed trials in a row;
        returns the count of failures in a row."""
        if RETRY in outcomes:
            raise SweepStopped(
                f"a trial of study {study_name} was stopped by a problem outside its config (see the warning "
                "above); it is queued again: fix the problem and rerun the same command"
            )
        for outcome in outcomes:
            if outcome != TAKEN:  # a trial another worker re-queued meanwhile says nothing about its config
                failures_in_a_row = 0 if outcome == COMPLETE else failures_in_a_row + 1
        if failures_in_a_row >= self.max_consecutive_failures:
            raise SweepFailed(
                f"the last {failures_in_a_row} trials of study {study_name} failed because of their configs "
                "(the reasons are logged above); fix the search space or the config"
            )
        return failures_in_a_row

    def run_trials(self, study: optuna.Study, trials: list[Trial], space: dict, fixed: dict) -> list[JobReturn]:
        """Launch the trials' jobs, beating for them while it waits (a job in a process of its own beats too, while it
        trains: dmg/sweeps/job.py); if this process is stopped meanwhile, queue again those no job still trains."""
        overrides = self.trial_overrides(study, trials, space, fixed)
        try:
            with heartbeat(study._storage, trials, self.heartbeat_interval):
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        except BaseException as error:
            requeue_stopped(study, trials, f"the sweep stopped ({type(error).__name__})")
            raise
        self.job_idx += len(returns)
        return returns

    def parse_search_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
        """Distributions of the sampled parameters and the fixed overrides, from ``params`` then the command line."""
        self._process_searchspace_config()
        arguments = [*self._parse_sweeper_params_config(), *arguments]
        options = self.hydra_context.config_loader.get_group_options
        try:
            space, fixed = create_params_from_overrides([expand_glob(argument, options) for argument in arguments])
        except ValueError as error:  # Optuna's distributions check their ranges (log scale from 0, low > high)
            raise UserError(f"hydra.sweeper.params: an impossible range: {str(error).splitlines()[0]}") from None
        space = {name: value for name, value in space.items() if name not in fixed}
        check_search_space(self.config, list(space))  # conditional ones exist only when their condition holds
        return space, fixed

    def open_study(self, names: list[str]) -> optuna.Study:
        """Load (or create) the study; a storage URL gets heartbeats, and a new SQLite file is created whole.

        Queued trials with parameters outside the search space ``names`` (left by an earlier command with a typo)
        are dropped, so that the corrected command repairs the study."""
        storage = self.storage
        with store_lock(storage):
            create_sqlite_atomically(storage, _create_optuna_tables)
            storage = optuna.storages.RDBStorage(
                storage, heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period
            )
            study = uncached(
                optuna.create_study(
                    study_name=self.study_name,
                    storage=storage,
                    sampler=self.sampler,
                    direction=self._get_directions()[0],
                    load_if_exists=True,
                )
            )
            drop_misfits(study, names)
        trials = study.get_trials(deepcopy=False)
        if trials:  # a seeded sampler would otherwise repeat the suggestions it made when the study began
            self.sampler.reseed_rng()
        log.info("study %s: %d of %d trials finished", study.study_name, finished(trials, names), self.n_trials)
        return study

    def start_trials(self, study: optuna.Study) -> list[Trial]:
        """Ask for (and claim) the trials to run now: at most ``n_jobs``, and no more than the study still lacks.

        Counting and asking hold the storage's lock, so workers counting at the same instant never start more
        than ``n_trials`` together (Optuna's ``MaxTrialsCallback`` counts without one)."""
        requeue_abandoned(study, self.grace_period)
        window("count")
        with store_lock(self.storage):
            trials = study.get_trials(deepcopy=False)
            busy = sum(trial.state == TrialState.RUNNING for trial in trials)
            size = max(0, min(self.n_jobs, self.n_trials - finished(trials, self.searched) - busy))
            window("ask")  # counted, not yet asked
            return [claim(study.ask()) for _ in range(size)]

    def wait_for_others(self, study: optuna.Study) -> None:
        """The study lacks only trials that other live processes run: wait for them (or for them to go silent)."""
        awaited = ", ".join(f"{trial.number} ({_process_name(trial)})" for trial in running(study))
        if awaited != self.awaited:  # said once for each set of trials waited for
            log.info(
                "study %s: waiting for trials %s; a trial is queued again once its processes (sweeper, and job if apart) "
                "are dead or its heartbeat stops for %s s",
                study.study_name,
                awaited,
                self.grace_period,
            )
            self.awaited = awaited
        time.sleep(min(self.heartbeat_interval, WAIT_POLL_SECONDS))

    def trial_overrides(
        self, study: optuna.Study, trials: list[Trial], space: dict, fixed: dict
    ) -> list[tuple[str, ...]]:
        """Each trial's command-line overrides, plus its description under ``trial_key``.

        The fixed overrides are stored as the trials' user attributes with URL passwords masked; the jobs get them
        as given."""
        self._configure_trials(trials, space, masked(dict(fixed)))
        overrides = [tuple(f"{name}={value}" for name, value in {**trial.params, **fixed}.items()) for trial in trials]
        if not self.trial_key:
            return list(overrides)
        return [
            (*each, f"{self.trial_key}={describe(study.study_name, trial)}") for each, trial in zip(overrides, trials)
        ]


def drop_misfits(study: optuna.Study, names: list[str]) -> None:
    """Mark FAIL (not counted) the WAITING trials whose parameters are not in the search space."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        strays = sorted(set(trial.params) - set(names))
        if strays and study._storage.set_trial_state(trial._trial_id, TrialState.FAIL):
            log.warning("trial %d is dropped: %s not in the search space any more", trial.number, ", ".join(strays))


def check_search_space(config: DictConfig, names: list[str]) -> None:
    """Every searched name is a key of the config (or a config group), before the study is touched: a typo such as
    ``method.overlap_lamda`` is one line, instead of a trial queued with a parameter no run can take."""
    for name in names:
        key = name.lstrip("+~")
        if name.startswith("+") or OmegaConf.select(config, key, default=_MISSING) is not _MISSING:
            continue
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(config, parent) if parent else config
        known = sorted(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(key.rpartition(".")[2], known, n=1)
        hint = f" (did you mean {'.'.join(filter(None, [parent, close[0]]))}?)" if close else ""
        raise UserError(f"hydra.sweeper.params: {key} is not a key of the config{hint}; nothing was queued")


_MISSING = object()


def _process_name(trial) -> str:
    """The process that runs ``trial``: its job's where it recorded one, else its sweeper's."""
    process = trial.system_attrs.get(JOB_ATTR) or trial.system_attrs.get(PROCESS_ATTR) or {}
    return f"process {process.get('pid', '?')} on {process.get('host', '?')}"


def _create_optuna_tables(url: str) -> None:
    storage = optuna.storages.RDBStorage(url)
    storage.engine.dispose()


def save_results(study: optuna.Study, path: Path) -> dict:
    """Write the best trial (params, value, overrides to rerun it) and the trial counts to a YAML file."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(trial.state.name.lower() for trial in trials)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    if not complete:
        raise SweepFailed(f"no trial of study {study.study_name} completed ({dict(states)})")
    best = study.best_trial
    results = {
        "name": "optuna",
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "overrides": [f"{name}={value}" for name, value in best.params.items()],
        "trials": dict(states),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")  # workers sharing the folder write it whole, in turn
    OmegaConf.save(OmegaConf.create(masked(results)), partial)
    os.replace(partial, path)
    log.info("best trial %d of %s: %s = %s", best.number, study.study_name, best.params, best.value)
    return results


def describe(study_name: str, trial: Trial) -> str:
    """The trial as a Hydra override value: ``{study:'s',number:3,origin:3,params:{mask:'scalar',mask.val:1.2}}``.

    ``origin`` is the trial it stands for: itself, or the first trial of its retries (see dmg/sweeps/trials.py).
    """
    params = ",".join(f"{name}:{hydra_literal(value)}" for name, value in trial.params.items())
    return f"{{study:{hydra_literal(study_name)},number:{trial.number},origin:{origin(trial)},params:{{{params}}}}}"


def hydra_literal(value: Any) -> str:
    """A value written so that Hydra's override parser reads it back unchanged."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def expand_glob(argument: str, group_options: Callable[[str], list[str]]) -> str:
    """``mask=glob(*)`` becomes ``mask=choice(normal,random_uniform,scalar)``: the config group's options."""
    override = OverridesParser.create().parse_override(argument)
    if not isinstance(override.value(), Glob):
        return argument
    key = override.get_key_element()
    options = override.value().filter(group_options(key.lstrip("+~")))
    return f"{key}=choice({','.join(options)})"


def parse_condition(name: str, spec: Mapping) -> Condition:
    """``{when: {mask: scalar}, values: interval(-1, 3)}``: the condition and the distribution to sample."""
    try:
        space, _ = create_params_from_overrides([f"{name}={spec['values']}"])
    except ValueError as error:  # an impossible range, such as a log scale from 0
        raise UserError(f"conditional parameter {name}: an impossible range: {str(error).splitlines()[0]}") from None
    if name not in space:
        raise UserError(
            f"conditional parameter {name}: values must be a sweep such as interval(0, 1), got {spec['values']!r}"
        )
    return dict(spec["when"]), space[name]


def extend_with(conditions: dict[str, Condition], user_extender: Callable | None) -> Callable:
    """The sweeper's search-space hook: sample each conditional parameter whose condition holds."""

    def extend(config, trial: Trial) -> None:
        if user_extender:
            user_extender(config, trial)
        chosen = {**trial.user_attrs, **trial.params}  # fixed overrides are stored as user attributes
        for name, (when, distribution) in conditions.items():
            if name not in trial.user_attrs and all(str(chosen.get(key)) == str(value) for key, value in when.items()):
                trial._suggest(name, distribution)

    return extend

"""Resumable, failure-tolerant Optuna searches as Hydra multiruns (``hydra/sweeper=dmg_optuna``, docs/sweeps.md).

hydra-optuna-sweeper 1.3 asks for ``n_trials`` new trials on every call, leaves the trials of a killed process
RUNNING forever, ends the whole sweep when one job fails or returns NaN (``max_failure_rate`` counts per batch) and
knows neither conditional parameters nor ``glob(*)``. ``ResumableOptuna`` keeps its parsing of the search space
and replaces its batch loop:

- ``n_trials`` is the size of the whole study: rerunning the command, or a second worker on the same storage,
  runs only the trials still missing (finished trials are never rerun);
- a trial whose process died is found by its stopped heartbeat, marked failed and queued again with the same
  parameters (the run's config hash then lets it continue from its checkpoint);
- a trial that raises or returns NaN/inf is recorded as FAIL, with the reason in its ``failure`` user attribute,
  and the sweep goes on (it stops only after ``max_consecutive_failures`` failures in a row);
- each job gets ``<trial_key>={study: ..., number: ..., params: {...}}`` so that its MLflow run can be tagged;
- ``conditional_params`` are sampled only when other parameters take given values (``mask.val`` for
  ``mask=scalar``) and ``group=glob(*)`` searches over every option of a config group.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from dmg.errors import UserError

log = logging.getLogger(__name__)

FAILURE_ATTR = "failure"  # user attribute of a trial that failed on its own (not by a killed process)
Condition = tuple[dict[str, Any], BaseDistribution]


class SweepFailed(Exception):
    """Too many trials in a row failed: the search space or the config is probably broken."""


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
        super().__init__(
            sampler, direction, storage, study_name, n_trials, n_jobs, 1.0, None, custom_search_space, params
        )
        if isinstance(sampler, functools.partial):  # the grid sampler, built from the search space
            raise UserError("for a grid use Hydra's basic sweeper (python launch.py -m name=a,b,c), not dmg_optuna")
        if len(self._get_directions()) != 1:
            raise UserError("dmg_optuna optimises one objective: give hydra.sweeper.direction one value")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_consecutive_failures = max_consecutive_failures
        self.trial_key = trial_key
        self.results_file = Path(results_file)
        conditions = {name: parse_condition(name, spec) for name, spec in (conditional_params or {}).items()}
        self.custom_search_space_extender = extend_with(conditions, self.custom_search_space_extender)

    def sweep(self, arguments: list[str]) -> None:
        """Run trials until the study holds ``n_trials`` finished ones; write the best trial to ``results_file``."""
        space, fixed = self.parse_search_space(arguments)
        study = self.open_study()
        failures_in_a_row = 0
        while (size := self.batch_size(study)) > 0:
            trials = [study.ask() for _ in range(size)]
            overrides = self.trial_overrides(study, trials, space, fixed)
            with heartbeat(study._storage, trials, self.heartbeat_interval):
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, job in zip(trials, returns):
                failures_in_a_row = 0 if record(study, trial, job) else failures_in_a_row + 1
            if failures_in_a_row >= self.max_consecutive_failures:
                raise SweepFailed(
                    f"the last {failures_in_a_row} trials of study {study.study_name} failed; see the log above"
                )
        save_results(study, self.results_file)

    def parse_search_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
        """Distributions of the sampled parameters and the fixed overrides, from ``params`` then the command line."""
        self._process_searchspace_config()
        arguments = [*self._parse_sweeper_params_config(), *arguments]
        options = self.hydra_context.config_loader.get_group_options
        space, fixed = create_params_from_overrides([expand_glob(argument, options) for argument in arguments])
        return {name: value for name, value in space.items() if name not in fixed}, fixed

    def open_study(self) -> optuna.Study:
        """Load (or create) the study; a storage URL gets heartbeats and re-queues the trials of dead processes."""
        storage = self.storage
        if isinstance(storage, str):
            with stable_enough():
                retry = optuna.storages.RetryFailedTrialCallback()
            storage = optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period,
                failed_trial_callback=retry,
            )
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=self.sampler,
            direction=self._get_directions()[0],
            load_if_exists=True,
        )
        trials = study.get_trials(deepcopy=False)
        if trials:  # a seeded sampler would otherwise repeat the suggestions it made when the study began
            self.sampler.reseed_rng()
        log.info("study %s: %d of %d trials finished", study.study_name, finished(trials), self.n_trials)
        return study

    def batch_size(self, study: optuna.Study) -> int:
        """How many trials to start now: at most ``n_jobs``, and no more than the study still lacks."""
        with stable_enough():
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        running = sum(trial.state == TrialState.RUNNING for trial in trials)
        return max(0, min(self.n_jobs, self.n_trials - finished(trials) - running))

    def trial_overrides(
        self, study: optuna.Study, trials: list[Trial], space: dict, fixed: dict
    ) -> list[tuple[str, ...]]:
        """Each trial's command-line overrides, plus its description under ``trial_key``."""
        overrides = self._configure_trials(trials, space, fixed)
        if not self.trial_key:
            return list(overrides)
        return [
            (*each, f"{self.trial_key}={describe(study.study_name, trial)}") for each, trial in zip(overrides, trials)
        ]


@contextmanager
def stable_enough() -> Iterator[None]:
    """Heartbeats and trial retries are marked experimental in optuna 2.10, the version hydra-optuna-sweeper pins."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def finished(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count toward ``n_trials``: completed, pruned, or failed on their own (not killed)."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or FAILURE_ATTR in t.user_attrs for t in trials)


def record(study: optuna.Study, trial: Trial, job: JobReturn) -> bool:
    """Tell the study how the trial's job ended; returns whether it completed."""
    try:
        value = float(job.return_value)  # re-raises the job's exception
    except Exception as error:  # noqa: BLE001 - any failure of a job is a failed trial
        return fail(study, trial, f"{type(error).__name__}: {error}", None if isinstance(error, UserError) else error)
    if not math.isfinite(value):
        return fail(study, trial, f"the objective is {value}", None)
    study.tell(trial, values=[value])
    return True


def fail(study: optuna.Study, trial: Trial, reason: str, error: BaseException | None) -> bool:
    trial.set_user_attr(FAILURE_ATTR, reason[:1000])
    study.tell(trial, state=TrialState.FAIL)
    log.warning("trial %d failed: %s", trial.number, reason, exc_info=error)
    return False


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trials: list[Trial], interval: int) -> Iterator[None]:
    """Record the trials' heartbeats every ``interval`` seconds while their jobs run."""
    if not storage.is_heartbeat_enabled():
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name="optuna-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
    OmegaConf.save(OmegaConf.create(results), path)
    log.info("best trial %d of %s: %s = %s", best.number, study.study_name, best.params, best.value)
    return results


def describe(study_name: str, trial: Trial) -> str:
    """The trial as a Hydra override value: ``{study:'s',number:3,params:{mask:'scalar',mask.val:1.2}}``."""
    params = ",".join(f"{name}:{hydra_literal(value)}" for name, value in trial.params.items())
    return f"{{study:{hydra_literal(study_name)},number:{trial.number},params:{{{params}}}}}"


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
    space, _ = create_params_from_overrides([f"{name}={spec['values']}"])
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

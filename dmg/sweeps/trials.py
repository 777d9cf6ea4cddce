"""The life of an Optuna trial in a shared, resumable study: who runs it, how it ended, and when to run it again.

A trial is FAIL for good only for reasons of its own (its config or numerics: a ``UserError``, a non-finite
objective); that failure counts toward ``n_trials``. Anything else (a store error, a full disk, a killed process)
puts it back in the queue with the same parameters and never consumes the study.

Every trial records the process running it (host, pid, process start time). A trial whose process died on this
host is re-queued at once; one on another host when its heartbeat has been silent for the grace period.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import optuna
from hydra.core.utils import JobReturn
from optuna.trial import FrozenTrial, Trial, TrialState

from dmg.errors import SetupError, UserError

log = logging.getLogger(__name__)

FAILURE_ATTR = "failure"  # user attribute of a trial that failed because of its own config or numerics
PROCESS_ATTR = "process"  # system attribute: {host, pid, started} of the process running the trial
COMPLETE, FAILED, RETRY = "complete", "failed", "retry"


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (tells a reused pid apart), where known."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_dead(process: dict) -> bool:
    """Whether a process recorded by :func:`this_process` on this host has ended; False where it cannot be told."""
    if process.get("host") != socket.gethostname():
        return False
    try:
        os.kill(process["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    started = process_start(process["pid"])
    return bool(started and process.get("started") and started != process["started"])


def finished(trials: list[FrozenTrial]) -> int:
    """Trials that count toward ``n_trials``: completed, pruned, or failed because of their own config."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or FAILURE_ATTR in t.user_attrs for t in trials)


def claim(trial: Trial) -> Trial:
    """Record that this process runs ``trial``."""
    trial.set_system_attr(PROCESS_ATTR, this_process())
    return trial


def requeue_abandoned(study: optuna.Study, grace_period: float) -> list[int]:
    """Re-queue the RUNNING trials nobody runs: dead process on this host, silent heartbeat, or never claimed."""
    with stable_enough():
        optuna.storages.fail_stale_trials(study)  # heartbeat silent for the grace period: re-queued by the callback
    abandoned = [trial for trial in running(study) if _abandoned(trial, grace_period)]
    for trial in abandoned:
        requeue(study, trial, "its process is gone")
    return [trial.number for trial in abandoned]


def _abandoned(trial: FrozenTrial, grace_period: float) -> bool:
    process = trial.system_attrs.get(PROCESS_ATTR)
    if process is None:  # asked but never claimed: its process died at once
        return (datetime.now() - trial.datetime_start).total_seconds() > grace_period
    return is_dead(process)


def running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def requeue(study: optuna.Study, trial: FrozenTrial | Trial, reason: str) -> None:
    """Mark a RUNNING trial failed without counting it, and queue its parameters again (as Optuna's retry does)."""
    storage = study._storage
    if storage.set_trial_state(trial._trial_id, TrialState.FAIL):
        retry(study, storage.get_trial(trial._trial_id))
        log.warning("trial %d is queued again: %s", trial.number, reason)


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial's parameters again, remembering the trial it stands for (Optuna's ``failed_trial``).

    The storage's callback for trials whose heartbeat stopped, and the re-queue of any other abandoned trial.
    """
    system_attrs = {"failed_trial": origin(trial)} | {
        key: value for key, value in trial.system_attrs.items() if key not in (PROCESS_ATTR, "failed_trial")
    }
    with stable_enough():
        waiting = optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=trial.user_attrs,
            system_attrs=system_attrs,
        )
        study.add_trial(waiting)


def origin(trial: Trial | FrozenTrial) -> int:
    """The number of the trial this one stands for (itself, or the first trial of its retries)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def record(study: optuna.Study, trial: Trial, job: JobReturn) -> str:
    """Tell the study how the trial's job ended: ``complete``, ``failed`` (its own fault) or ``retry``."""
    try:
        value = float(job.return_value)  # re-raises the job's exception
    except Exception as error:  # noqa: BLE001 - every way a job can end is sorted below
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, UserError) and not isinstance(error, SetupError):
            return fail(study, trial, reason)
        log.warning("trial %d stopped by a problem outside its config", trial.number, exc_info=error)
        requeue(study, trial, reason.splitlines()[0])
        return RETRY
    if not math.isfinite(value):
        return fail(study, trial, f"the objective is {value}")
    study.tell(trial, values=[value])
    return COMPLETE


def fail(study: optuna.Study, trial: Trial, reason: str) -> str:
    trial.set_user_attr(FAILURE_ATTR, reason[:1000])
    study.tell(trial, state=TrialState.FAIL)
    log.warning("trial %d failed: %s", trial.number, reason)
    return FAILED


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trials: list[Trial], interval: int) -> Iterator[None]:
    """Record the trials' heartbeats every ``interval`` seconds while their jobs run."""
    if not storage.is_heartbeat_enabled():
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                for trial in trials:
                    storage.record_heartbeat(trial._trial_id)
            except Exception as error:  # noqa: BLE001 - a busy store must not stop the heartbeat for good
                log.warning("could not record a heartbeat (%s); trying again", error)
            stop.wait(interval)

    thread = threading.Thread(target=beat, daemon=True, name="optuna-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def stable_enough() -> Iterator[None]:
    """Heartbeats and trial retries are marked experimental in optuna 2.10, the version hydra-optuna-sweeper pins."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield

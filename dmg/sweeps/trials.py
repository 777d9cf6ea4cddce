"""The life of an Optuna trial in a shared, resumable study: who runs it, how it ended, and when to run it again.

A trial is FAIL for good only for reasons of its own (its config or numerics: a ``UserError``, a non-finite
objective); that failure counts toward ``n_trials``. Anything else (a store error, a full disk, a killed process)
puts it back in the queue with the same parameters and never consumes the study.

Every trial records the process running it (host, boot, PID namespace, pid, start time and a random token): the
sweeper's, and once its job starts in a process of its own (a SLURM job, say), the job's too; both record its
Optuna heartbeat, the sweeper while it waits for the job, the job while it trains (dmg/sweeps/job.py). A trial is
abandoned when neither is left: re-queued at once when both processes died on this host (same boot and PID
namespace), otherwise when its heartbeat has been silent for the grace period. A sweeper that dies while its job
trains elsewhere thus leaves the trial to the job; a job that starts after its trial was re-queued does nothing.

Several workers share the study, so every way out of RUNNING (complete, fail, re-queue) is one compare-and-set
transaction in the storage (``UPDATE ... WHERE state = RUNNING``): whichever worker gets there first wins and the
others see it was done; a re-queue marks the trial FAIL and adds its WAITING copy in the same transaction, so a
crash between the two loses nothing. Optuna 2.10's own ``fail_stale_trials`` and ``tell`` read the state, then
write it: two workers could both pass the read (a crash, or one trial run twice), hence the transactions here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import optuna
from hydra.core.utils import JobReturn
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, Trial, TrialState

from dmg.errors import SetupError, UserError
from dmg.runs.stores import mask_secrets
from dmg.runs.windows import window

log = logging.getLogger(__name__)

FAILURE_ATTR = "failure"  # user attribute of a trial that failed because of its own config or numerics
PROCESS_ATTR = "process"  # system attribute: the identity of the process running the trial (this_process)
JOB_ATTR = "job"  # system attribute: the identity of the process training it, when that is not the sweeper
HOST_ENV = "DMG_HOST_ID"  # overrides the host name in a process's identity (tests play a second host with it)
COMPLETE, FAILED, RETRY, TAKEN = "complete", "failed", "retry", "taken"
TOKEN = secrets.token_hex(8)  # tells this process apart from any other, whatever namespaces hide


def this_process() -> dict:
    """Who runs a trial: enough to tell, on another worker, whether this process is dead or merely elsewhere."""
    return {
        "host": host_name(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": _link("/proc/self/ns/pid"),
        "pid": os.getpid(),
        "started": process_start(os.getpid()),
        "token": TOKEN,
    }


def host_name() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (tells a reused pid apart), where known."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_dead(process: dict) -> bool:
    """Whether a process recorded by :func:`this_process` has ended; False where this process cannot tell.

    Its pid means something here only on the same host, boot and PID namespace (containers sharing a host name
    have their own pids).
    """
    here = this_process()
    if any(process.get(key) != here[key] or here[key] is None for key in ("host", "boot", "pid_namespace")):
        return False
    try:
        os.kill(process["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    started = process_start(process["pid"])
    return bool(started and process.get("started") and started != process["started"])


def finished(trials: list[FrozenTrial], searched: Collection[str]) -> int:
    """Trials that count toward ``n_trials``: completed, pruned, or failed because of their own config, unless that
    config had parameters outside the search space ``searched`` (a typo of an earlier command, since corrected)."""
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (FAILURE_ATTR in t.user_attrs and set(t.params) <= set(searched))
        for t in trials
    )


def claim(trial: Trial) -> Trial:
    """Record that this process runs ``trial``, with a first heartbeat: a trial whose process dies before its
    heartbeat thread starts is still found stale."""
    trial.set_system_attr(PROCESS_ATTR, this_process())
    if trial.study._storage.is_heartbeat_enabled():
        trial.study._storage.record_heartbeat(trial._trial_id)
    return trial


def uncached(study: optuna.Study) -> optuna.Study:
    """The study reading and writing its RDB storage directly.

    Optuna's cache assumes that only the worker that asked a trial changes it; here any worker may re-queue an
    abandoned trial, and the owner must see that.
    """
    study._storage = getattr(study._storage, "_backend", study._storage)
    return study


def requeue_abandoned(study: optuna.Study, grace_period: float) -> list[int]:
    """Re-queue the RUNNING trials nobody runs: silent heartbeat, dead process on this host, or never claimed."""
    storage = uncached(study)._storage
    stale = set(storage._get_stale_trial_ids(study._study_id)) if storage.is_heartbeat_enabled() else set()
    requeued = []
    for trial in running(study):
        reason = _abandoned(trial, trial._trial_id in stale, grace_period)
        if reason:
            window("requeue")  # seen as abandoned; another worker may be re-queueing it too
            if requeue(study, trial, reason):
                requeued.append(trial.number)
    return requeued


def _abandoned(trial: FrozenTrial, stale: bool, grace_period: float) -> str | None:
    """Why ``trial`` is abandoned, or None if it may still be running: by its sweeper, or by its job."""
    process = trial.system_attrs.get(PROCESS_ATTR)
    job = trial.system_attrs.get(JOB_ATTR)
    if stale:
        return f"its heartbeat stopped for more than {grace_period:g} s ({_process_name(job or process)})"
    if process is None:  # asked but never claimed: its process died at once
        started = trial.datetime_start or datetime.now()
        return "it was never started" if (datetime.now() - started).total_seconds() > grace_period else None
    if not is_dead(process) or (job and not is_dead(job)):
        return None
    return f"its process is gone ({_process_name(process)}{f', its job {_process_name(job)}' if job else ''})"


def _process_name(process: dict | None) -> str:
    process = process or {}
    return f"process {process.get('pid', '?')} on {process.get('host', '?')}"


def running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def requeue(study: optuna.Study, trial: FrozenTrial | Trial, reason: str) -> bool:
    """Mark a RUNNING trial failed without counting it, and queue its parameters again (as Optuna's retry does),
    in one transaction; False when another worker ended or re-queued it first, or a job claimed it since
    ``trial`` was read (it is not abandoned then)."""
    storage = uncached(study)._storage
    copy = waiting_copy(storage.get_trial(trial._trial_id))  # its parameters are set before its job starts
    seen_job = trial.system_attrs.get(JOB_ATTR)

    def queue_copy(session) -> None:
        if _job_of(session, trial._trial_id) != seen_job:
            raise _ClaimedMeanwhile
        window("requeue.write")  # between the FAIL and the WAITING write: one transaction, nothing is lost
        storage._create_new_trial(study._study_id, copy)

    try:
        if not _while_running(storage, trial._trial_id, _ended(TrialState.FAIL), queue_copy):
            return False
    except _ClaimedMeanwhile:
        return False
    log.warning("trial %d is queued again: %s", trial.number, reason)
    return True


class _ClaimedMeanwhile(Exception):
    """A job recorded itself on the trial after the trial was found abandoned: the re-queue is rolled back."""


def _job_of(session, trial_id: int) -> dict | None:
    """The job recorded on a trial, as this transaction sees it."""
    row = (
        session.query(models.TrialSystemAttributeModel.value_json)
        .filter_by(trial_id=trial_id, key=JOB_ATTR)
        .one_or_none()
    )
    return json.loads(row[0]) if row else None


def claim_for_job(storage, trial_id: int) -> bool:
    """Record that this process (a trial's job, started apart from its sweeper) trains the trial, if it is still
    RUNNING, and beat once; False when it is not (it was re-queued before the job started).

    The check and the record are one transaction that writes the trial's row, so that a worker re-queueing the
    trial at the same instant either sees the job (and leaves the trial) or makes this claim fail."""

    def record_job(session) -> None:
        storage._set_trial_system_attr_without_commit(session, trial_id, JOB_ATTR, this_process())

    if not _while_running(storage, trial_id, {"state": TrialState.RUNNING}, record_job):
        return False
    storage.record_heartbeat(trial_id)
    return True


def requeue_stopped(study: optuna.Study, trials: list[Trial], reason: str) -> None:
    """The sweep stopped while ``trials`` ran: queue them again at once, except those that a job of their own still
    trains (alive here, or on another host): those are left to their job's heartbeat, which a worker watches."""
    for trial in trials:
        job = trial.system_attrs.get(JOB_ATTR)
        if job and not is_dead(job):
            log.warning("trial %d is left to its job (%s), which still trains it", trial.number, _process_name(job))
        else:
            requeue(study, trial, reason)


def waiting_copy(trial: FrozenTrial) -> FrozenTrial:
    """A WAITING trial with ``trial``'s parameters, remembering the trial it stands for (Optuna's ``failed_trial``,
    as its ``RetryFailedTrialCallback`` records it)."""
    system_attrs = {"failed_trial": origin(trial)} | {
        key: value for key, value in trial.system_attrs.items() if key not in (PROCESS_ATTR, JOB_ATTR, "failed_trial")
    }
    with stable_enough():
        return optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=trial.user_attrs,
            system_attrs=system_attrs,
        )


def _while_running(storage, trial_id: int, values: dict, also=None) -> bool:
    """Write ``values`` to a trial's row and do ``also(session)``, in one transaction, if the trial is still
    RUNNING; False if it is not (another worker got there first)."""
    with _create_scoped_session(storage.scoped_session) as session:
        changed = (
            session.query(models.TrialModel)
            .filter(models.TrialModel.trial_id == trial_id, models.TrialModel.state == TrialState.RUNNING)
            .update(values, synchronize_session=False)
        )
        if changed and also:
            also(session)
    return bool(changed)


def _ended(state: TrialState) -> dict:
    """The values that move a trial out of RUNNING to ``state``."""
    return {"state": state, "datetime_complete": datetime.now()}


def origin(trial: Trial | FrozenTrial) -> int:
    """The number of the trial this one stands for (itself, or the first trial of its retries)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def record(study: optuna.Study, trial: Trial, job: JobReturn) -> str:
    """Tell the study how the trial's job ended: ``complete``, ``failed`` (its own fault), ``retry``, or ``taken``
    (another worker re-queued it meanwhile, its heartbeat having stopped: the copy stands for it)."""
    try:
        value = float(job.return_value)  # re-raises the job's exception
    except Exception as error:  # noqa: BLE001 - every way a job can end is sorted below
        reason = mask_secrets(f"{type(error).__name__}: {error}")
        if isinstance(error, UserError) and not isinstance(error, SetupError):
            return fail(study, trial, reason)
        log.warning("trial %d stopped by a problem outside its config", trial.number, exc_info=error)
        return RETRY if requeue(study, trial, reason.splitlines()[0]) else _taken(trial)
    if not math.isfinite(value):
        return fail(study, trial, f"the objective is {value}")
    window("tell")  # the job is done; another worker may be re-queueing the trial
    storage = uncached(study)._storage

    def store_value(session) -> None:
        session.add(models.TrialValueModel(trial_id=trial._trial_id, objective=0, value=value))

    completed = _while_running(storage, trial._trial_id, _ended(TrialState.COMPLETE), store_value)
    return COMPLETE if completed else _taken(trial)


def fail(study: optuna.Study, trial: Trial, reason: str) -> str:
    storage = uncached(study)._storage

    def store_reason(session) -> None:
        value = json.dumps(mask_secrets(reason)[:1000])
        session.add(models.TrialUserAttributeModel(trial_id=trial._trial_id, key=FAILURE_ATTR, value_json=value))

    if not _while_running(storage, trial._trial_id, _ended(TrialState.FAIL), store_reason):
        return _taken(trial)
    log.warning("trial %d failed: %s", trial.number, reason)
    return FAILED


def _taken(trial: Trial) -> str:
    log.warning(
        "trial %d was queued again by another worker while it ran here (its heartbeat had stopped): its copy "
        "stands for it, this result is not counted",
        trial.number,
    )
    return TAKEN


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trials: list[Trial], interval: int) -> Iterator[None]:
    """Record the trials' heartbeats every ``interval`` seconds while this sweeper waits for their jobs."""
    if not storage.is_heartbeat_enabled():
        yield
        return
    with beating(lambda: [storage.record_heartbeat(trial._trial_id) for trial in trials], interval):
        yield


@contextmanager
def beating(beat: Callable[[], object], interval: float) -> Iterator[None]:
    """Call ``beat`` every ``interval`` seconds, in a thread, while the block runs (and not after it)."""
    stop = threading.Event()

    def keep_beating() -> None:
        while not stop.is_set():
            try:
                beat()
            except Exception as error:  # noqa: BLE001 - a busy store must not stop the heartbeat for good
                log.warning("could not record a heartbeat (%s); trying again", mask_secrets(str(error)))
            stop.wait(interval)

    thread = threading.Thread(target=keep_beating, daemon=True, name="optuna-heartbeat")
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

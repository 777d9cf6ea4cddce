"""A trial's side of an Optuna sweep, in the process that trains it: the trial's heartbeat while it trains.

With ``hydra/launcher=slurm`` a trial's job is a SLURM job on another node: it goes on training when its sweeper
dies. So that the trial is found abandoned only when the process that *trains* it has stopped, a job running in a
process of its own records itself on its trial (``job``, beside the sweeper's ``process``) and beats for it, every
``heartbeat_interval`` seconds, until it ends; a job started after its trial was re-queued (its sweeper died while
the job waited in SLURM's queue) stops at once: the trial's copy runs it. A job in the sweeper's own process (the
basic launcher) leaves both to the sweeper.

The sweeper tells its jobs the study's storage through ``SWEEP_ENV``, which SLURM jobs inherit (sbatch exports the
environment), as they inherit the MLflow parent run's id: the URL may hold a database password, and the environment
is the one channel that is neither the config (logged as MLflow params) nor a file. The trial itself comes from the
job's config (``tracking.trial``: study and number). Optuna is imported by sweep trials only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from dmg.engine.ranks import ranks_from_environment
from dmg.errors import SetupError
from dmg.runs.stores import mask_secrets, sqlite_file

log = logging.getLogger(__name__)

SWEEP_ENV = "DMG_OPTUNA_SWEEP"  # {storage, heartbeat_interval, trial_key, sweeper: [pid, token]}, set by the sweeper


class TrialTaken(SetupError):
    """This job's trial was re-queued before the job started: the trial's copy runs it, this job does nothing."""


@contextmanager
def sweep_environment(storage: str, heartbeat_interval: float, trial_key: str | None) -> Iterator[None]:
    """The sweeper's side: ``SWEEP_ENV`` set, for the jobs it launches, while the block runs."""
    from dmg.sweeps.trials import TOKEN

    sweep = {"storage": anchored(storage), "heartbeat_interval": heartbeat_interval, "trial_key": trial_key}
    previous = os.environ.get(SWEEP_ENV)
    os.environ[SWEEP_ENV] = json.dumps(sweep | {"sweeper": [os.getpid(), TOKEN]})
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SWEEP_ENV, None)
        else:
            os.environ[SWEEP_ENV] = previous


def anchored(storage: str) -> str:
    """``storage`` with a relative SQLite path made absolute: a job may run in another folder (hydra.job.chdir)."""
    path = sqlite_file(storage)
    if path is None or path.is_absolute():
        return storage
    _, separator, query = storage.partition("?")
    return f"sqlite:///{path.absolute()}{separator}{query}"


@contextmanager
def trial_heartbeat(cfg: DictConfig) -> Iterator[None]:
    """The job's side: its trial's heartbeat while the block (the training) runs, when this process is a sweep
    trial's job of its own; nothing otherwise. Raises :class:`TrialTaken` when the trial was re-queued already.

    A heartbeat that fails (the store briefly down) is logged and tried again: it never stops the training."""
    sweep = _sweep_of_this_job(cfg)
    if sweep is None:
        yield
        return
    from dmg.sweeps.trials import beating

    trial = OmegaConf.select(cfg, sweep["trial_key"])
    job = TrialJob(sweep["storage"], sweep["heartbeat_interval"], str(trial.study), int(trial.number))
    try:
        job.claim()
    except TrialTaken:
        raise
    except Exception as error:  # noqa: BLE001 - the store may be down for a moment: the heartbeat tries again
        log.warning("could not record this job on trial %d (%s); trying again", job.number, mask_secrets(str(error)))
    with beating(job.beat, sweep["heartbeat_interval"]):
        yield


def _sweep_of_this_job(cfg: DictConfig) -> dict | None:
    """The sweep whose trial this process trains, when it is a job of its own (not the sweeper's process) and the
    run's writer (rank 0 of a DDP job); None otherwise."""
    sweep = json.loads(os.environ.get(SWEEP_ENV) or "null")
    if not sweep or not sweep.get("trial_key") or not ranks_from_environment().is_writer:
        return None
    if not OmegaConf.select(cfg, sweep["trial_key"], default=None):
        return None
    pid, token = sweep["sweeper"]
    if pid == os.getpid():
        from dmg.sweeps.trials import TOKEN

        if token == TOKEN:
            return None  # the sweeper's own process: it beats for its trials itself
    return sweep


class TrialJob:
    """This process as the job of trial ``number`` of study ``study``: it claims the trial, then beats for it."""

    def __init__(self, storage_url: str, heartbeat_interval: float, study: str, number: int):
        self.storage_url, self.heartbeat_interval = storage_url, heartbeat_interval
        self.study, self.number = study, number
        self.storage = None
        self.trial_id: int | None = None
        self.claimed = self.taken = False

    def claim(self) -> None:
        """Record this process on the trial (and a first heartbeat); raises :class:`TrialTaken` when the trial is no
        longer RUNNING."""
        import optuna

        from dmg.sweeps.trials import claim_for_job, stable_enough

        if self.storage is None:
            with stable_enough():
                self.storage = optuna.storages.RDBStorage(self.storage_url, heartbeat_interval=self.heartbeat_interval)
        if self.trial_id is None:
            study_id = self.storage.get_study_id_from_name(self.study)
            self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        if not claim_for_job(self.storage, self.trial_id):
            raise TrialTaken(
                f"trial {self.number} of study {self.study} was queued again before this job started (its sweeper "
                "had stopped): its copy runs it, this job does nothing"
            )
        self.claimed = True

    def beat(self) -> None:
        """One heartbeat (the claim first, if the store was down when the job started)."""
        if self.taken:
            return
        if self.claimed:
            self.storage.record_heartbeat(self.trial_id)
            return
        try:
            self.claim()
        except TrialTaken as taken:
            self.taken = True
            log.warning("%s; its heartbeat stops", taken)

"""MLflow tracking of a run: config as params, per-epoch metrics, the selected model, summary and plots.

Runs carry a ``config_hash`` tag (the hash of everything that determines the result) so that rerunning an
interrupted run's command finds its MLflow run and continues it. Metric logging is idempotent per (key, step):
a run resumed after a kill anywhere never records a step twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import matplotlib.pyplot
from mlflow.entities import DatasetInput, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from omegaconf import DictConfig, OmegaConf

from dmg.errors import RunInProgress
from dmg.runs.stores import mask_secrets, masked, mlflow_client, store_lock
from dmg.runs.windows import window

log = logging.getLogger(__name__)

BOOKKEEPING_KEYS = (
    "resume", "tracking", "checkpoint_dir", "num_workers", "progress", "keep_checkpoints", "distributed"
)  # fmt: skip
HOST_TAG, PID_TAG = "dmg.host", "dmg.pid"
ENDED = ("KILLED", "FAILED")
# a unique key broken by a concurrent insert, as SQLite, PostgreSQL and MySQL word it
DUPLICATE_KEY = re.compile(r"UNIQUE constraint failed|duplicate key value|Duplicate entry", re.IGNORECASE)
# Settings added after runs were first recorded, with the value that reproduces the older behaviour: at that value
# they are left out of the hash, so a run started before they existed is still found and continued.
# Add every new setting here (tests/test_configs.py pins the hashes of a few configs).
KEYS_ADDED_SINCE: dict[str, object] = {
    # how a run is spread over processes (a bookkeeping key: N ranks compute what one process does)
    "distributed.backend": "auto",
    "distributed.timeout_s": 600,
    "distributed.sync_batch_norm": True,
    "deterministic": False,
    "method.forward": "joint",  # one forward pass on the whole batch, as before per-domain passes existed
    "backbone.freeze_bn": False,
    "backbone.network.freeze_bn": False,
}
LEGACY_MODULE = re.compile(r"\bdmg\.(?:engine|runs|sweeps|commands)\.")
LEGACY_COMMAND = re.compile(r"python -m dmg (report|bench|prepare)\b")


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config minus bookkeeping keys: equal hashes mean the same experiment.

    A trial of an Optuna sweep also hashes its study and the trial it stands for (``tracking.trial.origin``: a
    trial queued again after its process died stands for the original), so two trials that sample the same
    values are two runs, while a re-queued trial continues the run of the trial it replaces.
    """
    content = _with_legacy_targets(OmegaConf.to_container(cfg, resolve=True))
    trial = (content.get("tracking") or {}).get("trial") or {}
    for key in BOOKKEEPING_KEYS:
        content.pop(key, None)
    for dotted, default in KEYS_ADDED_SINCE.items():
        _drop_if(content, dotted.split("."), default)
    if trial:
        content["trial"] = [trial.get("study"), trial.get("origin", trial.get("number"))]
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _drop_if(tree: dict, path: list[str], default) -> None:
    """Remove the key at ``path`` from the nested dict ``tree`` when it holds ``default``."""
    *parents, last = path
    for key in parents:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return
    if last in tree and tree[last] == default:
        del tree[last]


def _with_legacy_targets(tree):
    """The config as spelled before the package was grouped into subpackages (``dmg.engine.averaging.SWAD`` was
    ``dmg.averaging.SWAD``, ``python -m dmg prepare`` was ``python -m dmg.prepare`` in hints), so that the hashes
    of runs started before the move stay the same and those runs are still found and continued."""
    if isinstance(tree, Mapping):
        return {key: _with_legacy_targets(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_with_legacy_targets(value) for value in tree]
    if isinstance(tree, str):
        return LEGACY_COMMAND.sub(r"python -m dmg.\1", LEGACY_MODULE.sub("dmg.", tree))
    return tree


def flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``("optim.network.lr", "0.001")`` pairs: MLflow params from a nested config."""
    for key, value in tree.items():
        name = f"{prefix}{key}".replace("_target_", "target").replace("_partial_", "partial")
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, str(value)[:MAX_PARAM_VAL_LENGTH]


class RunFinished(Exception):  # noqa: N818 - an outcome, not an error
    """The run of this config finished meanwhile (in another process): ``run`` holds its result."""

    def __init__(self, run: Run):
        super().__init__(run.info.run_id)
        self.run = run


class Tracker:
    """One MLflow run, plus the exclusive lock that marks it as in progress on this machine."""

    def __init__(self, client: MlflowClient, run_id: str, lock: RunLock, resumed: bool):
        self.client = client
        self.run_id = run_id
        self.lock = lock
        self.resumed = resumed
        self.held = held_metrics(client, run_id) if resumed else {}  # what the store holds: {key: {step: value}}
        self.logged_steps = {key: max(values) for key, values in self.held.items()}

    @classmethod
    def start(
        cls,
        cfg: DictConfig,
        tags: dict[str, str],
        checkpoint_root: Path,
        dataset: DatasetInput | None = None,
        curated: Mapping[str, str] | None = None,
    ) -> Tracker:
        """Continue the interrupted run of this exact config (``resume`` auto/skip_finished) or start a new one.

        ``curated``: params logged beside the flattened config (``hp/...``, the ones to compare runs by).

        Raises :class:`RunInProgress` when a live process holds that run. Finding or creating the run is done
        under a lock per config, so two identical commands started together never make two runs.
        """
        client = mlflow_client(cfg.tracking.uri)
        experiment = experiment_id(client, cfg.tracking.experiment)
        digest = config_hash(cfg)
        tags = {**tags, "config_hash": digest, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        tags = {key: mask_secrets(value) for key, value in tags.items()}
        retried = _retried(cfg)
        with config_lock(checkpoint_root, digest):
            if cfg.resume == "skip_finished":  # checked again under the lock: another process may have finished it
                for done in _runs_of_config(client, experiment, digest, finished=True, limit=1):
                    raise RunFinished(done)
            tracker = (
                cls._continue(client, experiment, digest, checkpoint_root, retried) if cfg.resume != "never" else None
            )
            if tracker is None:
                run = client.create_run(experiment, run_name=cfg.tracking.run_name, tags=tags)
                lock = RunLock(checkpoint_root / run.info.run_id)
                lock.acquire()
                tracker = cls(client, run.info.run_id, lock, resumed=False)
        if tracker.resumed:  # the tags of this attempt: host, pid, parent run and trial
            client.log_batch(tracker.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        logged = client.get_run(tracker.run_id) if tracker.resumed else None  # what a killed attempt got to log
        tracker.log_config(cfg, known=logged.data.params if logged else {}, curated=curated or {})
        if dataset and not (logged and logged.inputs.dataset_inputs):
            log_dataset(client, tracker.run_id, dataset)
        return tracker

    @classmethod
    def _continue(
        cls, client: MlflowClient, experiment: str, digest: str, checkpoint_root: Path, retried: bool = False
    ) -> Tracker | None:
        """The newest unfinished run of the config that this machine may take over, locked; None if there is none.

        A RUNNING run of another host is left alone (it may be alive there), unless this is a sweep trial queued
        again after the sweeper found the process of its previous attempt dead (``retried``).
        """
        for run in _runs_of_config(client, experiment, digest, finished=False):
            lock = RunLock(checkpoint_root / run.info.run_id)
            if not _may_take(run, lock, retried):
                log.warning(
                    "run %s of this config is %s on host %s: leaving it alone",
                    run.info.run_id,
                    run.info.status,
                    run.data.tags.get(HOST_TAG, "?"),
                )
                continue
            if not lock.acquire():
                raise _in_progress(run, lock)
            if client.get_run(run.info.run_id).info.status == "FINISHED":  # finished while we looked
                lock.release()
                raise RunFinished(client.get_run(run.info.run_id))
            client.update_run(run.info.run_id, status="RUNNING")
            return cls(client, run.info.run_id, lock, resumed=True)
        return None

    @staticmethod
    def check_not_in_progress(cfg: DictConfig, checkpoint_root: Path) -> None:
        """Raise :class:`RunInProgress` if a live process holds the unfinished run of this config that :meth:`start`
        would continue: the answer in seconds, before the data and the model are built. Writes nothing.

        Only a fast answer: :meth:`start` checks again, under the config's lock, when it takes the run (a process
        may take or free it in between).
        """
        if cfg.resume == "never":  # starts a run of its own
            return
        digest = config_hash(cfg)
        locked = config_lock(checkpoint_root, digest)
        if not locked.path.exists():  # no run of this config was ever started with this checkpoint_dir
            return
        client = mlflow_client(cfg.tracking.uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            return
        if cfg.resume == "skip_finished" and _runs_of_config(client, experiment.experiment_id, digest, True, 1):
            return  # its result is the answer
        with locked:  # a probe outside it could make a process taking the run over find its lock taken
            for run in _runs_of_config(client, experiment.experiment_id, digest, finished=False):
                lock = RunLock(checkpoint_root / run.info.run_id)
                if _may_take(run, lock, _retried(cfg)):
                    if lock.held():
                        raise _in_progress(run, lock)
                    return

    @property
    def directory(self) -> Path:
        """This run's local folder (checkpoints)."""
        return self.lock.directory

    def log_config(self, cfg: DictConfig, known: Mapping[str, str], curated: Mapping[str, str] = {}) -> None:  # noqa: B006
        """The resolved config as params, with the ``curated`` ones (but the ``known`` ones, already logged), and as
        ``config.yaml``; passwords in URLs (``tracking.uri``) are masked."""
        content = masked(OmegaConf.to_container(cfg, resolve=True))
        params = [Param(key, value) for key, value in flatten(content)]
        params += [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in curated.items()]
        params = [param for param in params if param.key not in known]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        self.log_text(OmegaConf.to_yaml(OmegaConf.create(content)), "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        """Log the metrics of ``step``, except those this run already holds for that step (a resumed run);
        returns the metrics as the store holds them.

        A resumed run recomputes the epochs after its checkpoint, and some were logged before it stopped; a value
        is logged once per step, so the first one stays (one row per epoch), and the run goes on with that value,
        so that its summary agrees with the store even where the recomputation rounds differently (on a GPU
        without ``deterministic=true``).
        """
        now = int(time.time() * 1000)
        new = [Metric(key, value, now, step) for key, value in metrics.items() if self.logged_steps.get(key, -1) < step]
        for start in range(0, len(new), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=new[start : start + MAX_METRICS_PER_BATCH])
        self.logged_steps.update({metric.key: step for metric in new})
        return {key: self.held.get(key, {}).get(step, value) for key, value in metrics.items()}

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, content: dict, name: str) -> None:
        self.client.log_dict(self.run_id, content, name)

    def log_figure(self, figure, name: str) -> None:
        """Log a matplotlib figure as an image and close it."""
        self.client.log_figure(self.run_id, figure, name)
        figure.clear()
        matplotlib.pyplot.close(figure)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status``; the run stays locked until :meth:`release`."""
        self.client.set_terminated(self.run_id, status)

    def release(self) -> None:
        self.lock.release()


class NoTracker:
    """What the ranks other than 0 of a DDP job hold instead of a :class:`Tracker`: the run's id; nothing is written."""

    resumed = False

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        return dict(metrics)

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def release(self) -> None:
        pass


def held_metrics(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """Every value a run holds, per metric and step (the first one logged at a step, should there be more)."""
    held: dict[str, dict[int, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.timestamp)
        for metric in history:
            held.setdefault(key, {}).setdefault(metric.step, metric.value)
    return held


def log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInput) -> None:
    """Record the run's dataset (MLflow's Dataset column). MLflow looks for the experiment's row of the dataset, then
    inserts it if missing: two runs of one experiment starting at the same instant can both miss it, and the second
    insert breaks the row's unique key. Tried again, the row is found."""
    try:
        client.log_inputs(run_id, datasets=[dataset])
    except MlflowException as error:
        if not DUPLICATE_KEY.search(str(error)):
            raise
        client.log_inputs(run_id, datasets=[dataset])


def _retried(cfg: DictConfig) -> bool:
    """Whether this is a sweep trial queued again after its previous attempt's process was found dead."""
    trial = cfg.tracking.get("trial") or {}
    return trial.get("origin", trial.get("number")) != trial.get("number")


def _may_take(run: Run, lock: RunLock, retried: bool) -> bool:
    """Whether this process may continue the unfinished ``run``: not while it may be alive on another host."""
    return lock.directory.exists() or _ran_here(run) or run.info.status in ENDED or retried


def _in_progress(run: Run, lock: RunLock) -> RunInProgress:
    return RunInProgress(
        f"run {run.info.run_id} of this config is in progress ({lock.holder()}): wait for it to end, "
        "or pass resume=never to start a separate run"
    )


def _ran_here(run: Run) -> bool:
    return run.data.tags.get(HOST_TAG, socket.gethostname()) == socket.gethostname()


class RunLock:
    """An exclusive lock on a run's folder, held while the run is alive; the OS frees it if the process dies.

    The lock file names its holder (host and pid), so a second process can say who runs the run.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._file = None

    def acquire(self) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        file = open(self.directory / "lock", "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        file.truncate(0)
        file.write(f"process {os.getpid()} on host {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return True

    def held(self) -> bool:
        """Whether a live process holds the lock now. A probe: it takes the lock for an instant when it is free,
        so call it under the config's lock, as every taker of a run's lock does."""
        try:
            file = open(self.directory / "lock")
        except FileNotFoundError:
            return False
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False

    def holder(self) -> str:
        try:
            return (self.directory / "lock").read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        """Unlock. A folder that holds nothing but the lock (the run ended before its first checkpoint) is removed
        first, while still locked: a failed or interrupted run leaves no empty folder behind."""
        if self._file:
            if [path.name for path in self.directory.iterdir()] == ["lock"]:
                (self.directory / "lock").unlink()
                self.directory.rmdir()
            self._file.close()
            self._file = None


class config_lock:  # noqa: N801 - used as a context manager, like a function
    """Serialises finding or creating the run of one config among the processes sharing ``checkpoint_root``."""

    def __init__(self, checkpoint_root: Path, digest: str):
        self.path = checkpoint_root / ".locks" / f"{digest}.lock"

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        self._file.close()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if needed; safe when another process creates it too (a database refuses a
    second experiment of one name; a ``file:`` store does not, so it is searched and created under its lock)."""
    for _ in range(3):
        with store_lock(client.tracking_uri):
            experiment = client.get_experiment_by_name(name)
            if experiment:
                return experiment.experiment_id
            window("experiment")  # searched, not yet created
            try:
                return client.create_experiment(name)
            except MlflowException:  # created meanwhile by another process
                continue
    raise RuntimeError(f"could not create MLflow experiment {name!r}")


def _runs_of_config(client: MlflowClient, experiment_id: str, digest: str, finished: bool, limit: int = 1000):
    """Runs of the config with this hash, newest first: the finished ones, or the unfinished ones."""
    status = f"attributes.status {'=' if finished else '!='} '{RunStatus.to_string(RunStatus.FINISHED)}'"
    query = f"tags.config_hash = '{digest}' and {status}"
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=limit)


def finished_run(cfg: DictConfig) -> Run | None:
    """The newest finished run of exactly this config (same hash) in its experiment, if there is one."""
    client = mlflow_client(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = _runs_of_config(client, experiment.experiment_id, config_hash(cfg), True, 1) if experiment else []
    return runs[0] if runs else None


def git_commit() -> str | None:
    """The commit of the code being run, if it lives in a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None

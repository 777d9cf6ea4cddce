"""MLflow tracking of a run: config as params, per-epoch metrics, checkpoints, summary and plots.

Runs carry a ``config_hash`` tag (the hash of everything that determines the result) so that rerunning an
interrupted run's command finds its MLflow run and continues it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import matplotlib.pyplot
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from omegaconf import DictConfig, OmegaConf

BOOKKEEPING_KEYS = ("resume", "tracking", "checkpoint_dir", "num_workers", "progress")


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config minus bookkeeping keys: equal hashes mean the same experiment."""
    content = OmegaConf.to_container(cfg, resolve=True)
    for key in BOOKKEEPING_KEYS:
        content.pop(key, None)
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``("optim.network.lr", "0.001")`` pairs: MLflow params from a nested config."""
    for key, value in tree.items():
        name = f"{prefix}{key}".replace("_target_", "target").replace("_partial_", "partial")
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, str(value)[:MAX_PARAM_VAL_LENGTH]


class Tracker:
    """One MLflow run, plus the exclusive lock that marks it as in progress on this machine."""

    def __init__(self, client: MlflowClient, run_id: str, lock: RunLock, resumed: bool):
        self.client = client
        self.run_id = run_id
        self.lock = lock
        self.resumed = resumed

    @classmethod
    def start(cls, cfg: DictConfig, tags: dict[str, str], checkpoint_root: Path) -> Tracker:
        """Continue the interrupted run of this exact config (``resume=auto``) or start a new one."""
        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        experiment = experiment_id(client, cfg.tracking.experiment)
        digest = config_hash(cfg)
        if cfg.resume != "never":
            for run in _runs_of_config(client, experiment, digest, finished=False):
                lock = RunLock(checkpoint_root / run.info.run_id)
                if (lock.directory / "last.pt").exists() and lock.acquire():
                    client.update_run(run.info.run_id, status="RUNNING")
                    return cls(client, run.info.run_id, lock, resumed=True)
        run = client.create_run(experiment, run_name=cfg.tracking.run_name, tags={**tags, "config_hash": digest})
        lock = RunLock(checkpoint_root / run.info.run_id)
        lock.acquire()
        tracker = cls(client, run.info.run_id, lock, resumed=False)
        tracker.log_config(cfg)
        return tracker

    @property
    def directory(self) -> Path:
        """This run's local folder (checkpoints)."""
        return self.lock.directory

    def log_config(self, cfg: DictConfig) -> None:
        params = [Param(key, value) for key, value in flatten(OmegaConf.to_container(cfg, resolve=True))]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        self.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

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
        self.client.set_terminated(self.run_id, status)
        self.lock.release()


class RunLock:
    """An exclusive lock on a run's folder, held while the run is alive; the OS frees it if the process dies."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._file = None

    def acquire(self) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        file = open(self.directory / "lock", "a")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        self._file = file
        return True

    def release(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created (with the database) if needed; safe when another process creates it too."""
    for _ in range(3):
        experiment = client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
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
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
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

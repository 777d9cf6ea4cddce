"""MLflow around Hydra multiruns: settings checked and the store created before any job starts, Optuna trials
nested under a parent run.

``Preflight`` (every multirun, conf/config.yaml) checks the sweep's settings (one line and exit 1 for a typo, a bad
value, an unusable folder or store, a bad sweeper option) and then creates the MLflow store and experiment once,
under the lock beside a SQLite store. ``SweepParentRun`` (Optuna recipes in sweeps/sweep/) opens one parent run
per study, hands its id to the jobs through ``PARENT_RUN_ENV`` (read by ``tracking.parent_run_id``), logs the best
trial on it at the end and never leaves it RUNNING: FINISHED when the study is complete, KILLED after Ctrl-C or
SIGTERM, FAILED when the sweep fails. ``sweep_tags`` turns a job's ``tracking`` config into its run's tags.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dmg.engine import signals
from dmg.errors import UserError
from dmg.runs.settings import check_overrides, check_settings
from dmg.runs.stores import SERVER_LOCKS, install_log_masking, mask_secrets, mlflow_client, scheme, store_lock
from dmg.runs.windows import window

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "DMG_MLFLOW_PARENT_RUN"
PARENT_TAG = "mlflow.parentRunId"
LOCKABLE = ("sqlite", "file", *SERVER_LOCKS)  # stores that dmg.runs.stores.store_lock locks (+ postgresql, mysql)


class MaskSecrets(Callback):
    """Keeps URL passwords (``tracking.uri``, ``hydra.sweeper.storage``) out of Hydra's files and logs.

    Hydra writes ``.hydra/{config,hydra,overrides}.yaml`` (and a grid's ``multirun.yaml``) just before a job
    starts, and logs each job's overrides: the files are rewritten masked here, and every log record is masked.
    """

    def __init__(self) -> None:
        install_log_masking()

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        install_log_masking()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        install_log_masking()

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        install_log_masking()
        hydra = config.hydra
        files = [Path(hydra.sweep.dir) / "multirun.yaml"] if str(hydra.mode).endswith("MULTIRUN") else []
        if hydra.output_subdir is not None:
            files += Path(hydra.runtime.output_dir, hydra.output_subdir).glob("*.yaml")
        for path in files:
            mask_file(path)


def mask_file(path: Path) -> None:
    """Rewrite a text file with its URL passwords masked (atomically; nothing to do when it holds none)."""
    try:
        text = path.read_text()
    except OSError:
        return
    if mask_secrets(text) != text:
        partial = path.with_name(f".{path.name}.masking")
        partial.write_text(mask_secrets(text))
        os.replace(partial, path)


class Preflight(Callback):
    """Checks a multirun's settings, then creates the MLflow store and experiment, before jobs start."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        """A single run's settings, checked before Hydra creates its output folder: bad input leaves nothing."""
        with exit_on_user_error():
            check_overrides(config, list(config.hydra.overrides.task), config.hydra.job.config_name)
            check_settings(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with exit_on_user_error():
            overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
            fixed = [override.input_line for override in overrides if not override.is_sweep_override()]
            check_overrides(config, fixed, config.hydra.job.config_name)
            check_settings(config)
            check_sweeper(config.hydra.sweeper)
            from dmg.runs.tracking import experiment_id  # MLflow: seconds to import, only when a multirun starts

            experiment_id(mlflow_client(self.tracking_uri), self.experiment)


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Hydra turns a callback's exception into a warning and goes on; bad input must stop the multirun instead.

    A ``UserError`` is logged as one line and the process exits with status 1 (``SystemExit`` passes Hydra).
    """
    try:
        yield
    except UserError as error:
        log.error("error: %s", error)
        sys.exit(1)


def check_sweeper(sweeper: DictConfig) -> None:
    """The options of our Optuna sweeper, checked before anything is written (other sweepers check their own)."""
    from dmg.sweeps.sweeper import check_options

    if str(sweeper.get("_target_", "")).endswith("ResumableOptunaSweeper"):
        check_options(sweeper)


class SweepParentRun(Callback):
    """One MLflow parent run per Optuna study; the best trial's params (tags) and value (metric) end up on it."""

    def __init__(
        self, tracking_uri: str, experiment: str, study: str, objective: str, results_file: str, storage: str = ""
    ):
        self.tracking_uri = tracking_uri
        self.storage = storage
        self.experiment = experiment
        self.study = study
        self.objective = objective
        self.results_file = Path(results_file)
        self.run_id: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        """An Optuna recipe run without ``-m``: one line, exit 1 (its trials need the sweeper)."""
        with exit_on_user_error():
            raise UserError(
                f"study {self.study} is an Optuna search: add -m to run its trials (python launch.py -m "
                f"{' '.join(config.hydra.overrides.task)})"
            )

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with exit_on_user_error():
            self.client = mlflow_client(self.tracking_uri)  # not in __init__: callbacks travel pickled to remote jobs
        from dmg.runs.tracking import experiment_id  # MLflow: seconds to import, only when a sweep starts

        self.run_id = self.find_or_create(experiment_id(self.client, self.experiment))
        os.environ[PARENT_RUN_ENV] = self.run_id
        atexit.register(self.end_unfinished)

    def find_or_create(self, experiment: str) -> str:
        """The study's parent run (a resumed study or another worker reuses it), set RUNNING.

        Under a lock: workers started together find or create one parent run, not one each.
        """
        query = f"tags.study = '{self.study}' and tags.sweep = 'optuna'"
        with self.lock():
            order = ["attributes.start_time ASC"]
            for run in self.client.search_runs([experiment], query, order_by=order, max_results=1):
                self.client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id
            window("parent")
            tags = {"study": self.study, "sweep": "optuna", "objective": self.objective}
            return self.client.create_run(experiment, run_name=f"sweep-{self.study}", tags=tags).info.run_id

    def lock(self):
        """The lock under which workers look for the parent run: the MLflow store's (SQLite, PostgreSQL, MySQL,
        ``file:``), or where it has none (an ``http://`` server), the Optuna storage's, which every worker of the
        study shares."""
        uri = self.tracking_uri if scheme(self.tracking_uri) in LOCKABLE or not self.storage else self.storage
        return store_lock(uri)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from mlflow.entities import Metric

        os.environ.pop(PARENT_RUN_ENV, None)
        results = OmegaConf.to_container(OmegaConf.load(self.results_file))
        for name, value in results["best_params"].items():
            self.client.set_tag(self.run_id, f"best.{name}", str(value))
        self.client.set_tag(self.run_id, "best.trial", str(results["best_trial"]))
        finished = sum(count for state, count in results["trials"].items() if state != "running")
        key = f"best/{self.objective}"
        with self.lock():  # the workers ending a study all report its best value: one point per step
            if finished not in {metric.step for metric in self.client.get_metric_history(self.run_id, key)}:
                now = int(time.time() * 1000)
                self.client.log_batch(self.run_id, metrics=[Metric(key, results["best_value"], now, finished)])
        self.client.log_artifact(self.run_id, str(self.results_file))
        self.client.set_terminated(self.run_id, "FINISHED")
        atexit.unregister(self.end_unfinished)

    def end_unfinished(self) -> None:
        """At exit without ``on_multirun_end``: the sweep was interrupted (KILLED) or failed (FAILED)."""
        status = "KILLED" if signals.stop_requested() else "FAILED"
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as error:  # noqa: BLE001 - the store may be what failed
            log.warning("could not mark the sweep's parent run %s %s: %s", self.run_id, status, error)


def sweep_tags(tracking: DictConfig) -> dict[str, str]:
    """Tags linking a run to its sweep: parent run, study, the trial it stands for (as its name and params say:
    a re-queued trial continues the run of the trial it replaces), the attempt that ran it last, sampled values."""
    tags = {PARENT_TAG: tracking.parent_run_id} if tracking.get("parent_run_id") else {}
    trial = tracking.get("trial")
    if trial:
        origin = trial.get("origin", trial.number)
        tags |= {"study": str(trial.study), "trial": str(origin), "trial.attempt": str(trial.number)}
        tags |= {f"trial.{name}": str(value) for name, value in trial.params.items()}
    return tags

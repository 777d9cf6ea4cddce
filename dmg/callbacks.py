"""MLflow around Hydra multiruns: the store is created before any job starts, Optuna trials nest under a parent run.

``TrackingStore`` (every multirun, conf/config.yaml) creates the MLflow database and experiment once, before
parallel jobs race to create them. ``SweepParentRun`` (Optuna recipes in sweeps/sweep/) opens one parent run per
study, hands its id to the jobs through ``PARENT_RUN_ENV`` (read by ``tracking.parent_run_id``) and, at the
end, logs the best trial on it. ``sweep_tags`` turns a job's ``tracking`` config into its run's tags.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from dmg.tracking import experiment_id

PARENT_RUN_ENV = "DMG_MLFLOW_PARENT_RUN"
PARENT_TAG = "mlflow.parentRunId"


class TrackingStore(Callback):
    """Creates the MLflow store and experiment in the sweep process, before jobs start."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        experiment_id(MlflowClient(self.tracking_uri), self.experiment)


class SweepParentRun(Callback):
    """One MLflow parent run per Optuna study; the best trial's params (tags) and value (metric) end up on it."""

    def __init__(self, tracking_uri: str, experiment: str, study: str, objective: str, results_file: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.study = study
        self.objective = objective
        self.results_file = Path(results_file)
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.client = MlflowClient(self.tracking_uri)  # not in __init__: callbacks travel pickled to remote jobs
        self.run_id = self.find_or_create(experiment_id(self.client, self.experiment))
        os.environ[PARENT_RUN_ENV] = self.run_id

    def find_or_create(self, experiment: str) -> str:
        """The study's parent run (a resumed study or another worker reuses it), set RUNNING."""
        query = f"tags.study = '{self.study}' and tags.sweep = 'optuna'"
        for run in self.client.search_runs([experiment], query, order_by=["attributes.start_time ASC"], max_results=1):
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        tags = {"study": self.study, "sweep": "optuna", "objective": self.objective}
        return self.client.create_run(experiment, run_name=f"sweep-{self.study}", tags=tags).info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        os.environ.pop(PARENT_RUN_ENV, None)
        results = OmegaConf.to_container(OmegaConf.load(self.results_file))
        for name, value in results["best_params"].items():
            self.client.set_tag(self.run_id, f"best.{name}", str(value))
        self.client.set_tag(self.run_id, "best.trial", str(results["best_trial"]))
        finished = sum(count for state, count in results["trials"].items() if state != "running")
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(f"best/{self.objective}", results["best_value"], int(time.time() * 1000), finished)],
        )
        self.client.log_artifact(self.run_id, str(self.results_file))
        if not results["trials"].get("running"):  # other workers are still at it otherwise
            self.client.set_terminated(self.run_id, "FINISHED")


def sweep_tags(tracking: DictConfig) -> dict[str, str]:
    """Tags linking a run to its sweep: parent run, study, trial number and sampled values."""
    tags = {PARENT_TAG: tracking.parent_run_id} if tracking.get("parent_run_id") else {}
    trial = tracking.get("trial")
    if trial:
        tags |= {"study": str(trial.study), "trial": str(trial.number)}
        tags |= {f"trial.{name}": str(value) for name, value in trial.params.items()}
    return tags

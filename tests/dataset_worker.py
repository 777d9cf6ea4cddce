"""Starts an MLflow run and records its dataset as ``Tracker.start`` does (dmg.runs.tracking.log_dataset), with
MLflow's insert of the dataset's row held at the race window ``dataset.insert``, and prints the run's id:
``python tests/dataset_worker.py TRACKING_URI``."""

import sys

import sqlalchemy
from mlflow.entities import Dataset, DatasetInput

from dmg.runs.stores import mlflow_client
from dmg.runs.tracking import experiment_id, log_dataset
from dmg.runs.windows import window


@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
def hold_the_dataset_insert(connection, cursor, statement, parameters, context, executemany):
    """MLflow has looked for the dataset's row and found none: it is about to insert one."""
    if statement.lstrip().upper().startswith("INSERT INTO DATASETS"):
        window("dataset.insert")


client = mlflow_client(sys.argv[1])
run = client.create_run(experiment_id(client, "race"))
log_dataset(client, run.info.run_id, DatasetInput(Dataset("rotated_mnist", "713a2a83", "local", "rotated_mnist")))
print(run.info.run_id)

"""Finds or creates a study's MLflow parent run as a sweep worker does (dmg.sweeps.callbacks.SweepParentRun) and
prints its id: ``python tests/parent_worker.py TRACKING_URI OPTUNA_STORAGE``."""

import sys

from dmg.runs.stores import mlflow_client
from dmg.runs.tracking import experiment_id
from dmg.sweeps.callbacks import SweepParentRun

tracking, storage = sys.argv[1:3]
parent = SweepParentRun(tracking, "race", "race-study", "value", "results.yaml", storage=storage)
parent.client = mlflow_client(tracking)
print(parent.find_or_create(experiment_id(parent.client, "race")))

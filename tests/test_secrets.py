"""A database password in ``tracking.uri`` or ``hydra.sweeper.storage`` is never written anywhere: not in a log line,
an MLflow param, tag or artifact, Hydra's ``.hydra/*.yaml``, an Optuna study or trial attribute, nor in the
database itself (checked with a real server's dump)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from dmg.runs.stores import install_log_masking, mask_secrets, masked
from dmg.sweeps.job import SWEEP_ENV, trial_heartbeat
from tests.postgres import PASSWORD

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.max_images=300", "backbone.network.width=4", "epochs=1", "progress=false"]


def test_passwords_of_urls_are_masked_in_text_and_configs():
    assert mask_secrets("uri postgresql+psycopg2://me:pa55@db:5432/x?sslmode=require") == (
        "uri postgresql+psycopg2://me:***@db:5432/x?sslmode=require"
    )
    assert (
        mask_secrets("http://me:tok@mlflow:5000 and sqlite:///a.db") == "http://me:***@mlflow:5000 and sqlite:///a.db"
    )
    assert masked({"tracking": {"uri": "mysql://a:b@h/d", "n": 3}, "l": ["postgresql://u:v@h"]}) == {
        "tracking": {"uri": "mysql://a:***@h/d", "n": 3},
        "l": ["postgresql://u:***@h"],
    }


def test_log_records_are_masked(caplog):
    install_log_masking()
    with caplog.at_level(logging.INFO):
        logging.getLogger("hydra.core").info("\t#%d : %s", 0, "tracking.uri=postgresql://u:hunter2@h/db")
    assert "hunter2" not in caplog.text and "postgresql://u:***@h/db" in caplog.text


def files_holding(folder: Path, secret: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


@pytest.mark.slow
def test_no_file_log_store_or_study_of_a_run_and_a_sweep_holds_the_password(postgres_server, tmp_path):
    storage, tracking = postgres_server.new_database(), postgres_server.new_database()
    assert PASSWORD in storage  # the server requires it: every URL carries the password
    quoted = [f"hydra.sweeper.storage='{storage}'", f"tracking.uri='{tracking}'"]
    sweep = [sys.executable, str(ROOT / "launch.py"), "-m", "+sweep=dmg_search", "hydra.sweeper.n_trials=2", *TINY]
    single = [sys.executable, str(ROOT / "launch.py"), *TINY, "seed=5", f"tracking.uri='{tracking}'"]
    outputs = []
    for command in (sweep + quoted, single):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout + done.stderr)
    assert all(PASSWORD not in output for output in outputs)
    assert "postgres:***@" in outputs[0]  # Hydra's launch line is there, masked
    assert files_holding(tmp_path, PASSWORD) == []
    assert (masked_hydra := files_holding(tmp_path, "postgres:***@"))  # .hydra/*.yaml, config.yaml, job logs ...
    assert any(path.endswith(".hydra/overrides.yaml") for path in masked_hydra)
    for database in (storage, tracking):
        assert PASSWORD not in postgres_server.dump(database)

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    assert len(runs) == 4  # parent, two trials, the single run
    for run in runs:
        assert PASSWORD not in repr(run.data.params) + repr(run.data.tags)
        if "config_hash" in run.data.tags:
            assert run.data.params["tracking.uri"] == mask_secrets(tracking)
            [artifact] = [path for path in tmp_path.rglob("config.yaml") if run.info.run_id in str(path)]
            assert mask_secrets(tracking) in artifact.read_text()
    study = optuna.load_study(study_name="dmg-rotated_mnist-small_cnn-rot30", storage=storage)
    assert [trial.user_attrs["tracking.uri"].strip("'") for trial in study.trials] == [mask_secrets(tracking)] * 2
    assert PASSWORD not in repr([(t.user_attrs, t.system_attrs) for t in study.trials]) + repr(study.system_attrs)


@pytest.mark.slow
def test_a_trial_job_beating_for_itself_writes_the_storage_password_nowhere(postgres_server, monkeypatch, caplog):
    """A trial's job apart from its sweeper (a SLURM job) gets the storage URL, password and all, from the
    environment; its claim, its heartbeats and its warnings (a store error quoting the URL) write no password."""
    storage = postgres_server.new_database()
    trial = optuna.create_study(study_name="fake", storage=storage).ask()
    sweep = {"storage": storage, "heartbeat_interval": 0.05, "trial_key": "tracking.trial", "sweeper": [0, "apart"]}
    monkeypatch.setenv(SWEEP_ENV, json.dumps(sweep))
    beats, record_heartbeat = [], optuna.storages.RDBStorage.record_heartbeat

    def store_down_once(self, trial_id: int) -> None:
        beats.append(trial_id)
        if len(beats) == 2:
            raise optuna.exceptions.StorageInternalError(f"could not connect to {storage}")
        record_heartbeat(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", store_down_once)
    job = OmegaConf.create({"tracking": {"trial": {"study": "fake", "number": trial.number}}})
    with caplog.at_level(logging.INFO), trial_heartbeat(job):
        wait_until(lambda: len(beats) >= 3)
    assert mask_secrets(storage) in caplog.text and PASSWORD not in caplog.text
    [trial] = optuna.load_study(study_name="fake", storage=storage).trials
    assert "job" in trial.system_attrs and PASSWORD not in repr(trial.system_attrs)
    assert PASSWORD not in postgres_server.dump(storage)


def wait_until(condition, seconds: float = 60) -> None:
    """Wait for ``condition``; the deadline catches a hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_password_given_by_pgpassword_reaches_no_file_of_a_sweep_of_separate_jobs(postgres_server, tmp_path):
    """docs/sweeps.md's way to keep the password out of submitit's job pickles: URLs without it, ``PGPASSWORD``."""
    storage, tracking = postgres_server.new_database(), postgres_server.new_database()
    storage, tracking = (url.replace(f":{PASSWORD}@", "@") for url in (storage, tracking))
    assert PASSWORD not in storage + tracking
    sweep = [sys.executable, str(ROOT / "launch.py"), "-m", "+sweep=dmg_search", "hydra.sweeper.n_trials=1", *TINY]
    sweep += ["hydra/launcher=submitit_local", f"hydra.sweeper.storage='{storage}'", f"tracking.uri='{tracking}'"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PGPASSWORD": PASSWORD}
    done = subprocess.run(sweep, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(tmp_path.rglob("*_submitted.pkl"))  # the jobs ran apart from the sweeper, pickled
    assert files_holding(tmp_path, PASSWORD) == []
    study = optuna.load_study(
        study_name="dmg-rotated_mnist-small_cnn-rot30", storage=storage.replace("@", f":{PASSWORD}@", 1)
    )
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE]

"""Shared fixtures: Hydra-composed configs that write only into the test's temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.mysql import mysql, mysql_server  # noqa: F401 - fixtures: a throwaway MariaDB server
from tests.postgres import postgres, postgres_server  # noqa: F401 - fixtures: a throwaway PostgreSQL server

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A fast run on the embedded data: 1,200 digits, a narrow CNN, few epochs.
QUICK = [
    "dataset.max_images=1200",
    "backbone=small_cnn",
    "backbone.network.width=8",
    "epochs=2",
    "progress=false",
]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config ``launch.py`` would see with these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture
def isolated(tmp_path) -> list[str]:
    """Overrides that send MLflow and checkpoints into ``tmp_path``."""
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"checkpoint_dir={tmp_path}/checkpoints"]


@pytest.fixture
def quick_config(isolated):
    """Compose a quick, isolated run config; extra overrides win."""
    return lambda *overrides: compose_config(QUICK + isolated + list(overrides))


def pytest_addoption(parser):
    parser.addoption(
        "--screenshots",
        metavar="FOLDER",
        help="tests/test_mlflow_ui.py writes its MLflow UI pictures there (docs/images for the docs) instead of a "
        "temporary folder",
    )

"""Errors sorted truthfully: a bad config value is one line; a bug keeps its traceback (and a sweep re-queues its
trial); only a damaged checkpoint counts as damaged; only a schema mismatch suggests ``mlflow db upgrade``."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dmg.engine.checkpoints import _read
from dmg.errors import UserError
from dmg.runs.experiment import build
from dmg.runs.stores import mlflow_client

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "node, message",
    [
        ({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3, "nope": 1}, "unexpected keyword"),
        ({"_target_": "torch.nn.Linear", "in_features": 2}, "missing 1 required positional argument"),
        ({"_target_": "no.such.Thing"}, "Error loading 'no.such.Thing'"),
    ],
)
def test_a_config_that_does_not_fit_its_constructor_is_one_line(node, message):
    with pytest.raises(UserError, match=message) as caught:
        build(OmegaConf.create(node), "backbone.network")
    assert str(caught.value).startswith("bad backbone.network setting") and "\n" not in str(caught.value)


def test_a_bug_inside_a_constructor_keeps_its_type_and_traceback():
    with pytest.raises(ZeroDivisionError) as caught:
        build(OmegaConf.create({"_target_": "fractions.Fraction", "numerator": 1, "denominator": 0}), "x")
    assert any(frame.name == "__new__" for frame in caught.traceback)  # raised inside the constructor, not hidden


def test_only_a_damaged_checkpoint_counts_as_damaged(tmp_path, caplog):
    good = tmp_path / "last.pt"
    torch.save({"epoch": 1, "epochs_from": 1}, good)
    truncated, garbage = tmp_path / "truncated.pt", tmp_path / "garbage.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage.write_bytes(b"not a checkpoint")
    assert _read(good) == {"epoch": 1, "epochs_from": 1} and _read(truncated) is None and _read(garbage) is None
    assert "truncated.pt cannot be read" in caplog.text and "garbage.pt cannot be read" in caplog.text
    (tmp_path / "moved_module.py").write_text("class State:\n    pass\n")
    saved = "import torch, moved_module; torch.save({'state': moved_module.State()}, 'sound.pt')"
    subprocess.run([sys.executable, "-c", saved], cwd=tmp_path, check=True)
    with pytest.raises(ModuleNotFoundError, match="moved_module"):  # a sound file the code cannot read any more
        _read(tmp_path / "sound.pt")


def test_only_a_schema_mismatch_suggests_mlflow_db_upgrade(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_client(uri)
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        connection.execute("update alembic_version set version_num = 'from_another_version'")
    reopen = f"from dmg.runs.stores import mlflow_client; mlflow_client({uri!r})"
    done = subprocess.run([sys.executable, "-c", reopen], cwd=ROOT, capture_output=True, text=True)
    assert "mlflow db upgrade" in done.stderr and "cannot open the MLflow store" in done.stderr
    (tmp_path / "empty").mkdir()
    other = f"from dmg.runs.stores import mlflow_client; mlflow_client('file:{tmp_path}/empty')"  # refused by MLflow 3
    done = subprocess.run([sys.executable, "-c", other], cwd=ROOT, capture_output=True, text=True)
    assert "cannot open the MLflow store" in done.stderr and "mlflow db upgrade" not in done.stderr

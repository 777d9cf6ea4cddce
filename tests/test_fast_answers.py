"""A rejected command is answered before torch, torchvision and MLflow are imported (seconds on a small machine),
and a process that stops early skips the interpreter's teardown of them once everything is written.

No timing thresholds: what is imported is read from ``python -X importtime``; the deadlines only catch a hang.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "mlflow", "matplotlib", "optuna")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["epochs=0"], "epochs must be an integer >= 1, got 0"),
        (["+epoch=3"], "unknown setting 'epoch': did you mean epochs?"),
        (["optim.lr=abc"], "optim.lr must be a number (default: 0.001), got 'abc'"),
        (["dataset=pacs", "target=skech"], "unknown domain 'skech': this dataset's domains are art_painting"),
        (["dataset=officehome", "sources=[art,art]"], "sources names art more than once"),
        (["tracking.uri=mlflow.db"], "for SQLite write sqlite:///mlflow.db"),
    ],
)
def test_a_rejected_command_imports_no_heavy_library(tmp_path, overrides, message):
    command = [sys.executable, "-X", "importtime", str(ROOT / "launch.py"), *overrides]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and message in result.stdout + result.stderr, result.stdout + result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not {name for name in imported if name.split(".")[0] in HEAVY}
    assert not list(tmp_path.iterdir())  # not even Hydra's outputs/<date>/<time>/ folder: checked before it exists


def test_exit_now_runs_the_exit_handlers_and_skips_the_teardown(tmp_path):
    script = textwrap.dedent(
        f"""
        import atexit, sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.argv = ["launch.py"]
        from launch import exit_now

        class TornDown:
            def __del__(self):
                open({str(tmp_path / "torn_down")!r}, "w").close()

        kept_until_teardown = TornDown()
        atexit.register(lambda: open({str(tmp_path / "handler_ran")!r}, "w").close())
        print("stopping", flush=True)
        exit_now(143)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143 and result.stdout == "stopping\n", result.stderr
    assert (tmp_path / "handler_ran").exists() and not (tmp_path / "torn_down").exists()

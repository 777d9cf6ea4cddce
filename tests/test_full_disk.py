"""A checkpoint that cannot be written for lack of room ends the run with one line naming ``checkpoint_dir``, no
traceback, the MLflow run marked FAILED and no partial file left.

Two real faults: the kernel's file-size limit (``RLIMIT_FSIZE``, any user, the write fails with EFBIG) and, where
this process may mount one, a tiny tmpfs that fills up (ENOSPC). The training state of the 128-wide CNN (about
18 MB) exceeds both limits, while the MLflow store (about 1 MB) and the selected model (about 6 MB) fit.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 8 * 2**20
RUN = ["dataset.max_images=120", "epochs=1", "method=aggregate", "backbone.network.width=128", "progress=false"]


def launch(folder: Path, checkpoint_dir: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [sys.executable, str(ROOT / "launch.py"), *RUN, f"checkpoint_dir={checkpoint_dir}"]
    return subprocess.run(
        command,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size if file_size_limit else None,
    )


def assert_one_line_and_a_failed_run(
    result: subprocess.CompletedProcess, folder: Path, checkpoints: Path, os_says: str
):
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1, output
    assert f"error: checkpoint_dir: no room to write {checkpoints}/" in errors[0], errors[0]
    assert f"last.pt ({os_says}): free space there or set checkpoint_dir to another disk" in errors[0], errors[0]
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    (record,) = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    assert record.info.status == "FAILED"
    assert not list(checkpoints.rglob("*.tmp"))


@pytest.mark.slow
def test_a_file_size_limit_while_checkpointing_is_one_line(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    result = launch(tmp_path, checkpoints, file_size_limit=LIMIT)
    assert_one_line_and_a_failed_run(result, tmp_path, checkpoints, os.strerror(27))  # EFBIG: "File too large"


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and shutil.which("umount") is not None


@pytest.mark.slow
@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root and mount(8)")
def test_a_full_file_system_while_checkpointing_is_one_line(tmp_path):
    checkpoints = tmp_path / "small_disk"
    checkpoints.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(checkpoints)], check=False)
    if mounted.returncode:
        pytest.skip("this process may not mount a tmpfs (no CAP_SYS_ADMIN)")
    try:
        result = launch(tmp_path, checkpoints)
        assert_one_line_and_a_failed_run(result, tmp_path, checkpoints, os.strerror(28))  # ENOSPC
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)

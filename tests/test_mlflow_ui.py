"""The MLflow UI (``mlflow ui``) starts on the project's SQLite store with the pinned packages and serves our runs."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dmg.runs.experiment import run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def search_runs(port: int) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": ["1"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)["runs"]


@pytest.mark.slow
def test_mlflow_ui_serves_the_runs_of_the_project_store(quick_config, tmp_path):
    run(quick_config("epochs=1"))
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                runs = search_runs(port)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not answer within 90 s")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [r["info"]["status"] for r in runs] == ["FINISHED"]
    assert {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}["method"] == "dmg"

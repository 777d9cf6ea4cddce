"""A real MLflow server for tests: ``mlflow ui`` on a SQLite store at a free local port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_DEADLINE = 120  # seconds: only a server that never answers takes this long


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(base_url: str, endpoint: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API (POST with a JSON body, GET without)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base_url}/api/2.0/mlflow/{endpoint}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


@contextmanager
def mlflow_ui(store: Path) -> Iterator[str]:
    """``mlflow ui`` on ``store``'s SQLite file (``mlflow.db``) at a free local port; yields its address once its
    API answers."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=store,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its workers share its process group, ended together below
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                api(base_url, "experiments/search", {"max_results": 10})
                break
            except OSError:
                assert time.monotonic() < deadline, f"mlflow ui did not answer within {START_DEADLINE} s"
                time.sleep(0.5)
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

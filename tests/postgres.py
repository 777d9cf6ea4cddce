"""A throwaway PostgreSQL server for the tests, from the system's binaries (Debian's ``postgresql`` package, which
``.ci/run`` installs): it runs on every Python the project supports, unlike a wheel that bundles the server.

The server listens on a Unix socket in a temporary folder only, and requires a password (SCRAM), so the URLs the
tests use carry one, as a real deployment's do. As root, it runs as the ``postgres`` user (PostgreSQL refuses root).
Where no server can be started the tests that need one skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PASSWORD = f"pw-{secrets.token_hex(8)}"  # unique: tests grep every output for it
_databases = itertools.count()


def binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``pg_dump``: the newest Debian install, or the one on PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    found = debian[-1] if debian else (Path(shutil.which("initdb")) if shutil.which("initdb") else None)
    return found.parent if found else None


class Server:
    """One PostgreSQL server in ``folder``, stopped (and its files deleted) by :meth:`stop`."""

    def __init__(self, folder: Path):
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL binaries (initdb): install Debian's postgresql package (.ci/run does)")
        self.folder = folder
        self.data = folder / "data"
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            os.chown(folder, pwd.getpwnam(self.user).pw_uid, -1)
        (folder / "password").write_text(PASSWORD)
        self.run("initdb", "-D", self.data, "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={folder}/password")
        options = f"-c listen_addresses='' -k {folder} -c max_connections=200 -c fsync=off"
        self.run("pg_ctl", "-D", self.data, "-o", options, "-l", folder / "log", "-w", "-t", "120", "start")

    def run(self, program: str, *arguments) -> subprocess.CompletedProcess:
        command = [str(self.bin / program), *map(str, arguments)]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{PASSWORD}@/{database}?host={self.folder}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"dmg{next(_databases)}"
        environment = {**os.environ, "PGPASSWORD": PASSWORD}
        command = [str(self.bin / "psql"), "-h", str(self.folder), "-U", "postgres", "-c", f"create database {name}"]
        subprocess.run(command, check=True, capture_output=True, env=environment, timeout=60)
        return self.url(name)

    def dump(self, url: str) -> str:
        """Everything a database holds, as SQL."""
        environment = {**os.environ, "PGPASSWORD": PASSWORD}
        database = url.split("?")[0].rsplit("/", 1)[1]
        command = [str(self.bin / "pg_dump"), "-h", str(self.folder), "-U", "postgres", database]
        return subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def throwaway(start, name: str, prefix: str, errors: tuple[type[BaseException], ...]) -> Iterator:
    """A server built by ``start(folder)`` in a new temporary folder, stopped after; skipped where none can start,
    except under CI, where that fails the test. ``errors``: what a failed start raises."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        server = start(folder)
    except errors as error:
        shutil.rmtree(folder, ignore_errors=True)
        detail = getattr(error, "stderr", "") or error
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no {name} server could be started: {detail}")
        pytest.skip(f"no {name} server could be started here: {detail}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Server]:
    """A running server; skipped where none can start, except under CI, where that fails the test."""
    yield from throwaway(Server, "PostgreSQL", "dmg-pg-", (OSError, RuntimeError, subprocess.SubprocessError, KeyError))


@pytest.fixture(scope="module")
def postgres(postgres_server) -> Iterator:
    """``postgres()`` returns the URL of a new, empty database on a throwaway server."""
    yield postgres_server.new_database

"""A throwaway MariaDB server for the tests, from the system's binaries (Debian's ``mariadb-server`` package, which
``.ci/run`` installs), spoken to through PyMySQL: the MySQL/MariaDB variant of tests/postgres.py.

The server listens on a Unix socket in a temporary folder only (no TCP port), and its ``root`` account has a password,
so the URLs the tests use carry one, as a real deployment's do. It runs as the current user (``--user``: MariaDB
refuses root without it). Where no server can be started the tests that need one skip, except under CI (``CI`` set),
where they fail.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import throwaway

PASSWORD = f"pw-{secrets.token_hex(8)}"
STARTUP_SECONDS = 120  # only a broken install takes this long
_databases = itertools.count()


def binary(*names: str) -> str | None:
    """The first of ``names`` on PATH or in /usr/sbin (where Debian puts the server, off a plain user's PATH)."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin")
        if found:
            return found
    return None


class Server:
    """One MariaDB (or MySQL) server in ``folder``, stopped (and its files deleted) by :meth:`stop`."""

    def __init__(self, folder: Path):
        server, install = binary("mariadbd", "mysqld"), binary("mariadb-install-db", "mysql_install_db")
        if server is None or install is None:
            raise RuntimeError("no MariaDB binaries (mariadbd): install Debian's mariadb-server package (.ci/run does)")
        import pymysql  # noqa: F401 - the driver the URLs name; missing, the tests skip (or fail under CI)

        self.folder, self.socket = folder, folder / "socket"
        user = pwd.getpwuid(os.geteuid()).pw_name
        data = ["--no-defaults", f"--datadir={folder}/data", f"--user={user}"]
        initialize = [install, *data, "--auth-root-authentication-method=normal", "--skip-test-db"]
        subprocess.run(initialize, check=True, capture_output=True, text=True, timeout=300)
        options = [f"--socket={self.socket}", "--skip-networking", f"--log-error={folder}/log", "--max-connections=300"]
        options += ["--innodb-flush-log-at-trx-commit=0", "--skip-log-bin"]  # a throwaway server: no durability
        self.process = subprocess.Popen([server, *data, *options], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self._wait_until_ready()
            self.execute(f"alter user root@localhost identified by '{PASSWORD}'", password="")
        except BaseException as error:
            self.stop()
            raise RuntimeError(f"mariadbd did not start: {error}") from error

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.socket.exists():
            log = self.folder / "log"
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-2000:] if log.exists() else "no log")
            time.sleep(0.1)

    def execute(self, statement: str, password: str = PASSWORD) -> None:
        import pymysql

        connection = pymysql.connect(user="root", password=password, unix_socket=str(self.socket), autocommit=True)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def url(self, database: str) -> str:
        return f"mysql+pymysql://root:{PASSWORD}@localhost/{database}?unix_socket={self.socket}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"dmg{next(_databases)}"
        self.execute(f"create database {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self.process.kill()  # a throwaway server: nothing to flush
            self.process.wait(timeout=60)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mysql_server() -> Iterator[Server]:
    """A running server; skipped where none can start, except under CI, where that fails the test."""
    errors = (OSError, RuntimeError, ImportError, subprocess.SubprocessError)
    yield from throwaway(Server, "MariaDB", "dmg-my-", errors)


@pytest.fixture(scope="module")
def mysql(mysql_server) -> Iterator:
    """``mysql()`` returns the URL of a new, empty database on a throwaway MariaDB server."""
    yield mysql_server.new_database

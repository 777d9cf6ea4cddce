"""The store lock on a real MariaDB server (a throwaway one from the system's binaries, tests/mysql.py): the server's
named lock, one per database, and one clear error where the server does not grant it. The sweeps that rely on it are
raced on MariaDB in tests/test_races.py."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from dmg.errors import SetupError
from dmg.runs import stores
from dmg.runs.stores import named_lock_name, store_lock
from tests.mysql import PASSWORD

DEADLINE = 60  # seconds: only a hang takes this long


def query(url: str, statement: str, **parameters):
    """The first value ``statement`` returns (None for a statement without rows), on a connection of its own."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            result = connection.execute(text(statement), parameters)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def test_the_store_lock_is_the_servers_named_lock_of_that_database(mysql):
    url, other = mysql(), mysql()
    name = named_lock_name(url.split("?")[0].rsplit("/", 1)[1])
    with store_lock(url):
        assert query(url, "select is_used_lock(:name)", name=name) is not None  # held on the server
        assert query(url, "select get_lock(:name, 0)", name=name) == 0  # so another connection cannot take it
        with store_lock(other):  # another database's lock is another lock
            pass
    assert query(url, "select is_used_lock(:name)", name=name) is None  # released


def test_a_lock_held_past_the_wait_is_one_line_naming_the_holder(mysql, monkeypatch):
    url = mysql()
    monkeypatch.setattr(stores, "NAMED_LOCK_SECONDS", 1)
    with store_lock(url):
        holder = query(url, "select is_used_lock(:name)", name=named_lock_name(url.split("?")[0].rsplit("/", 1)[1]))
        with pytest.raises(SetupError) as raised, store_lock(url):
            pytest.fail("the lock was taken twice")
    message = str(raised.value)
    assert f"connection {holder} of the server held it for all of 1 s; if it hangs, end it (KILL {holder})" in message
    assert message.startswith("store mysql+pymysql://root:***@") and PASSWORD not in message and "\n" not in message


def test_a_wait_the_server_interrupts_is_one_line_not_a_lock(mysql):
    url = mysql()
    outcome = {}

    def wait_for_the_lock() -> None:
        try:
            with store_lock(url):
                outcome["locked"] = True
        except SetupError as error:
            outcome["error"] = str(error)

    with store_lock(url):
        waiter = threading.Thread(target=wait_for_the_lock)
        waiter.start()
        waiting = "select id from information_schema.processlist where info like 'select get_lock%' limit 1"
        connection = None
        for _ in range(DEADLINE * 10):
            if (connection := query(url, waiting)) is not None:
                break
            time.sleep(0.1)
        assert connection is not None, "the second store_lock never waited"
        query(url, f"kill query {int(connection)}")  # GET_LOCK answers NULL
        waiter.join(DEADLINE)
    assert "locked" not in outcome
    assert "cannot take the store lock" in outcome["error"] and "GET_LOCK returned NULL" in outcome["error"]


def test_a_long_database_name_still_makes_a_valid_lock_name():
    long = named_lock_name("d" * 64)
    assert named_lock_name("optuna") == "dmgs:optuna" and len(long) == 64 and long != named_lock_name("d" * 63 + "e")

"""Opening the MLflow and Optuna stores safely, and checking them before a run writes anything.

Several processes (single runs, job-array tasks, sweep workers) often start at the same instant on a fresh
directory. A SQLite store is created and schema-migrated by its first user; done by two processes at once, the
migration corrupts it. Here every process opens a SQLite store while holding an exclusive lock on a file beside it
(``mlflow.db.lock``), so the store is created and migrated exactly once. On a database server the same lock is the
server's: an advisory lock (PostgreSQL) or a named lock (MySQL, MariaDB).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from dmg.errors import SetupError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smbfs", "smb3", "lustre", "gpfs", "beegfs", "fuse.sshfs", "ceph")
ADVISORY_LOCK_KEY = 0x646D6773  # "dmgs": the PostgreSQL advisory lock held while a store is created or migrated
NAMED_LOCK_PREFIX = "dmgs:"  # + the database: a MySQL named lock is the whole server's, an advisory lock a database's
NAMED_LOCK_LENGTH = 64  # MySQL's longest lock name
NAMED_LOCK_SECONDS = 600  # holders count trials or create a schema (seconds); one this slow has hung
MOUNTS = Path("/proc/mounts")
# the password of any URL with credentials: scheme://user:PASSWORD@host (a literal '@' in a password is %40)
URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/?#@'\"]*:)([^\s@/'\"]+)(@)")
MASK = "***"
DRIVER_HINTS = {
    "postgresql": 'for PostgreSQL: pip install -e ".[postgres]"',
    "mysql": 'for MySQL and MariaDB: pip install -e ".[mysql]"',
}
USAGE = "a store URI such as sqlite:///mlflow.db, http://host:5000 or postgresql://user@host/db"
SQLITE_FORM = "sqlite:///mlflow.db (three slashes before a relative path, four before an absolute one)"


def scheme(uri: str) -> str:
    """``sqlite`` for ``sqlite:///x.db``, ``postgresql`` for ``postgresql+psycopg2://...``; ``file`` for a path."""
    head, separator, _ = uri.partition(":")
    if not separator or len(head) == 1:  # a plain path, or a Windows drive letter
        return "file"
    return head.split("+")[0].lower()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores and in-memory databases."""
    if scheme(uri) != "sqlite":
        return None
    database = uri.split(":", 1)[1].removeprefix("///")
    if not database or database.startswith(":memory:") or database == "//":
        return None
    return Path(database.split("?")[0]).expanduser()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock for creating or migrating a store: a file beside a SQLite store or a ``file:`` store's
    folder (which lets two processes create one experiment name twice), an advisory lock in a PostgreSQL server or a
    named lock in a MySQL or MariaDB server (whose schema creations race just the same); nothing for other stores.

    Counting and asking for a study's trials hold it too, so it must be one lock for every process of the study."""
    kind = scheme(uri)
    if kind in SERVER_LOCKS:
        with SERVER_LOCKS[kind](uri):
            yield
        return
    beside = sqlite_file(uri) or local_folder(uri)
    if beside is None:
        yield
        return
    beside.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{beside}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def local_folder(uri: str) -> Path | None:
    """The folder of a ``file:`` store (``file:/abs/mlruns``, ``file:///abs/mlruns`` or a plain path)."""
    if scheme(uri) != "file":
        return None
    path = urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri
    return Path(path).expanduser().resolve()


@contextmanager
def _advisory_lock(uri: str) -> Iterator[None]:
    engine = _engine(uri)
    try:
        with engine.connect() as connection:
            connection.execute(text("select pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(text("select pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
    finally:
        engine.dispose()


@contextmanager
def _named_lock(uri: str) -> Iterator[None]:
    """MySQL and MariaDB: the server's named lock for this database, held by one connection for the duration (the
    server frees it when that connection ends, so a killed holder blocks no one). A wait that times out or is
    interrupted raises a :class:`SetupError`: going on without the lock would overshoot ``n_trials``."""
    name = named_lock_name(make_url(uri).database or "")
    engine = _engine(uri)
    try:
        with engine.connect() as connection:
            seconds = NAMED_LOCK_SECONDS
            taken = connection.execute(text("select get_lock(:name, :seconds)"), {"name": name, "seconds": seconds})
            taken = taken.scalar()
            if taken != 1:
                holder = connection.execute(text("select is_used_lock(:name)"), {"name": name}).scalar()
                raise SetupError(_not_locked(uri, name, taken, seconds, holder))
            try:
                yield
            finally:
                connection.execute(text("select release_lock(:name)"), {"name": name})
    finally:
        engine.dispose()


def named_lock_name(database: str) -> str:
    """The name of a database's store lock: ``dmgs:<database>``, or where that is too long, a digest of it."""
    name = f"{NAMED_LOCK_PREFIX}{database}"
    if len(name) <= NAMED_LOCK_LENGTH:
        return name
    digest = hashlib.sha256(database.encode()).hexdigest()
    return f"{NAMED_LOCK_PREFIX}{digest}"[:NAMED_LOCK_LENGTH]


def _not_locked(uri: str, name: str, taken: int | None, seconds: float, holder: int | None) -> str:
    """Why GET_LOCK did not take the lock: it answered 0 (it waited ``seconds`` while connection ``holder`` had the
    lock) or NULL (the server interrupted the wait)."""
    if taken is None:
        why = "the server interrupted the wait (GET_LOCK returned NULL: a KILL, or the server ran out of memory)"
    elif holder is None:
        why = f"another connection held it for all of {seconds:g} s"
    else:
        why = f"connection {holder} of the server held it for all of {seconds:g} s; if it hangs, end it (KILL {holder})"
    return f"store {shown(uri)}: cannot take the store lock {name!r}: {why}"


SERVER_LOCKS = {"postgresql": _advisory_lock, "mysql": _named_lock}  # the database servers store_lock locks


def _engine(uri: str, timeout: float = 10.0) -> sqlalchemy.engine.Engine:
    """A single-connection engine with a connect timeout (the drivers of PostgreSQL and MySQL take one)."""
    timeout_args = {"connect_timeout": int(timeout)} if scheme(uri) in ("postgresql", "mysql") else {}
    return sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=timeout_args)


def shown(uri: str) -> str:
    """A store URI fit for a message: a database password is masked."""
    return mask_secrets(uri)


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it masked (``postgresql://user:***@host/db``)."""
    return URL_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", text)


def masked(tree):
    """A config, mapping or list (``OmegaConf.to_container``'s output) with every URL password masked."""
    if isinstance(tree, dict):
        return {key: masked(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(masked(value) for value in tree)
    return mask_secrets(tree) if isinstance(tree, str) else tree


def install_log_masking() -> None:
    """Mask URL passwords in every log record of this process (Hydra's launch lines, job logs, our messages).

    A record factory, not a handler filter: Hydra reconfigures the handlers for every job.
    """
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "masks_secrets", False):
        return

    def masking_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = mask_secrets(message), ()
        return record

    masking_record.masks_secrets = True
    logging.setLogRecordFactory(masking_record)


def check_store_uri(uri: str, key: str, timeout: float = 5.0) -> None:
    """Raise a one-line :class:`SetupError` naming ``key`` unless ``uri`` is a store this run can use; writes nothing."""
    kind = scheme(uri)
    if kind == "sqlite":
        _check_sqlite(uri, key)
    elif kind in SERVER_SCHEMES:
        _check_server(uri, key, timeout)
    elif kind in DATABASE_SCHEMES:
        _check_database(uri, key, timeout)
    elif kind == "file":
        _check_plain_path(uri, key)
    else:
        raise SetupError(f"{key}={uri}: unknown store scheme {kind!r}; expected {USAGE}")


def _check_plain_path(uri: str, key: str) -> None:
    """A path without ``sqlite:///`` (``mlflow.db``) is not a database to MLflow but its retired file store."""
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return  # the user opted in to MLflow's file store (a folder of runs)
    path = uri.removeprefix("file://").removeprefix("file:")
    raise SetupError(
        f"{key}={uri}: a plain path is MLflow's retired file store, not a database; for SQLite write sqlite:///{path}"
    )


def _check_sqlite(uri: str, key: str) -> None:
    rest = uri.split(":", 1)[1]
    if rest != "//" and not rest.startswith("///"):  # sqlite://mlflow.db: the file name sits where a host would
        raise SetupError(f"{key}={uri}: not the form of a SQLite URI; expected {SQLITE_FORM}")
    database = sqlite_file(uri)
    if database is None:
        raise SetupError(f"{key}={uri}: an in-memory database keeps nothing; expected {USAGE}")
    if database.is_dir():
        raise SetupError(f"{key}={uri}: {database} is a folder; name a database file, e.g. sqlite:///mlflow.db")
    if database.exists():
        if not os.access(database, os.R_OK | os.W_OK):
            raise SetupError(f"{key}={uri}: {database} is not readable and writable by this user")
        with open(database, "rb") as handle:
            header = handle.read(len(SQLITE_MAGIC))
        if header and header != SQLITE_MAGIC:
            raise SetupError(f"{key}={uri}: {database} is not a SQLite database; name another file or move it aside")
    folder = _nearest_existing(database.parent)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise SetupError(f"{key}={uri}: cannot create files in {folder}; use a writable folder")
    warn_if_network_file_system(database, key)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_server(uri: str, key: str, timeout: float) -> None:
    """An MLflow tracking server answers ``/health``; checked with a short timeout instead of MLflow's retries."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise SetupError(
            f"{key}={uri}: no MLflow server answers there ({reason}); start one with `mlflow server` "
            "or use a local store such as sqlite:///mlflow.db"
        ) from None


def _check_database(uri: str, key: str, timeout: float) -> None:
    """The driver is installed and the server answers (within ``timeout`` seconds, not MLflow's retries)."""
    try:
        make_url(uri).get_dialect().dbapi()
    except ImportError as error:
        hint = DRIVER_HINTS.get(scheme(uri), "install the driver the URL names")
        raise SetupError(f"{key}={shown(uri)}: the database driver is not installed ({error}); {hint}") from None
    except Exception as error:  # noqa: BLE001 - sqlalchemy raises several types for a malformed URL
        raise SetupError(f"{key}={shown(uri)}: not a usable database URL ({error}); expected {USAGE}") from None
    engine = _engine(uri, timeout)
    try:
        with engine.connect():
            pass
    except Exception as error:  # noqa: BLE001 - drivers raise their own types
        raise SetupError(f"{key}={shown(uri)}: cannot connect to the database ({_first_line(error)})") from None
    finally:
        engine.dispose()


def warn_if_network_file_system(path: Path, key: str, mounts: Path = MOUNTS) -> None:
    """SQLite's locking is unreliable on network file systems: say so, with the alternative."""
    file_system = file_system_type(_nearest_existing(path), mounts)
    if file_system in NETWORK_FILE_SYSTEMS:
        log.warning(
            "%s: %s is on a network file system (%s), where SQLite locking is unreliable; "
            "for several machines use a database server (docs/sweeps.md)",
            key,
            path,
            file_system,
        )


def file_system_type(path: Path, mounts: Path = MOUNTS) -> str | None:
    """The type of the file system holding ``path`` (``ext4``, ``nfs4``, ...), from /proc/mounts where available."""
    try:
        mounted = [line.split()[1:3] for line in mounts.read_text().splitlines()]
    except OSError:
        return None
    resolved = str(path.resolve())
    matches = [
        (point, kind) for point, kind in mounted if resolved == point or resolved.startswith(point.rstrip("/") + "/")
    ]
    return max(matches, key=lambda match: len(match[0]))[1] if matches else None


def mlflow_client(uri: str) -> MlflowClient:
    """A client whose store exists and is migrated; a new SQLite store is created whole, under the lock beside it."""
    from mlflow.tracking import MlflowClient  # seconds to import: only where a store is opened

    try:
        with store_lock(uri):
            create_sqlite_atomically(uri, _create_mlflow_tables)
            client = MlflowClient(tracking_uri=uri)  # opens (and checks) the store, once per process
    except SetupError:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow and SQLAlchemy raise many types for a broken store
        hint = "; it was written by another MLflow version: back it up and run `mlflow db upgrade <uri>`"
        schema = "database schema" in str(error) or "alembic" in str(error).lower()
        raise SetupError(
            f"tracking.uri={shown(uri)}: cannot open the MLflow store ({_first_line(error)}){hint if schema else ''}"
        ) from None
    return client


def create_sqlite_atomically(uri: str, create: Callable[[str], None]) -> None:
    """Create a missing (or empty) SQLite store in a temporary file beside it, then move it into place.

    Creating and migrating a store takes seconds and is not transactional: a process killed meanwhile would
    leave a half-migrated database that no later process can open. Built aside, the store appears whole or not
    at all. Call under :func:`store_lock`; ``create(url)`` builds the schema at ``url``.
    """
    database = sqlite_file(uri)
    if database is None or (database.exists() and database.stat().st_size > 0):
        return
    partial = database.with_name(f"{database.name}.creating")
    for leftover in (partial, *(partial.with_name(partial.name + end) for end in ("-journal", "-wal", "-shm"))):
        leftover.unlink(missing_ok=True)  # left by a process killed while creating; we hold the lock
    create(f"sqlite:///{partial.absolute()}")
    os.replace(partial, database)


def _create_mlflow_tables(url: str) -> None:
    import mlflow.store.db.utils as db_utils

    engine = db_utils.create_sqlalchemy_engine_with_retry(url)
    try:
        db_utils._initialize_tables(engine)
    finally:
        engine.dispose()


def _first_line(error: BaseException) -> str:
    text = mask_secrets(str(error)).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"

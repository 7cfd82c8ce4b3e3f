"""One process at a time creates or migrates a new store's schema (MLflow's or Optuna's).

Two sweeps started together on a new SQLite file both ran MLflow's migrations, and one
died (``No such index ...``, or alembic's "expected to match one row"; issue 42). A
database server has the same race between drivers on different hosts (MLflow's own
guard is a lock file in this host's temporary folder; Optuna has none). So the first
open of a store happens under a lock that every opener of that store takes:

* a SQLite file: an exclusive ``flock`` on a file beside the database. The kernel
  releases it when its holder exits, so a crash never leaves it held, and the holder
  removes the file when done, so nothing is left beside the database;
* PostgreSQL: a session-level advisory lock (``pg_advisory_lock``); MySQL: ``GET_LOCK``.
  The server releases either when the holder's connection closes, a crash included.

Any other store (a tracking server, a file store) creates its own schema: no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["schema_lock", "sqlite_schema_lock"]

# The advisory lock's key: any 64-bit number that nothing else in the database uses for a lock.
_PG_KEY = 0x7232_7377_6565_70  # "r2sweep"
_MYSQL_NAME = "r2sweep-schema"
_WAIT_S = 300


@contextlib.contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Hold the schema lock of the store at ``uri`` (an SQLAlchemy URL, or anything else: no lock)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        with sqlite_schema_lock(Path(uri.removeprefix("sqlite:///").partition("?")[0])):
            yield
    elif uri.startswith(("postgresql", "mysql")):
        with _server_lock(uri):
            yield
    else:
        yield


@contextlib.contextmanager
def _server_lock(uri: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    postgres = uri.startswith("postgresql")
    engine = sqlalchemy.create_engine(uri, poolclass=NullPool)  # one connection, closed with the block
    try:
        try:
            connection = engine.connect()
        except sqlalchemy.exc.SQLAlchemyError:  # unreachable, refused: the store's own open says so, clearly
            yield
            return
        with connection:
            if postgres:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _PG_KEY})
            else:
                connection.execute(sqlalchemy.text("SELECT GET_LOCK(:name, :wait)"), {"name": _MYSQL_NAME, "wait": _WAIT_S})
            connection.commit()
            try:
                yield
            finally:
                unlock = "SELECT pg_advisory_unlock(:key)" if postgres else "SELECT RELEASE_LOCK(:name)"
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # closing the connection releases it too
                    connection.execute(sqlalchemy.text(unlock), {"key": _PG_KEY, "name": _MYSQL_NAME})
    finally:
        engine.dispose()


@contextlib.contextmanager
def sqlite_schema_lock(database: Path | None) -> Iterator[None]:
    """Hold the schema lock of the SQLite file ``database`` (None, or a folder that does not exist: no lock)."""
    if database is not None:
        database = database if database.is_absolute() else database.resolve()
    if database is None or not database.parent.is_dir():  # no file, or MLflow's own error to come
        yield
        return
    path = database.with_name(f".{database.name}.r2sweep-lock")
    while True:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(descriptor)  # the holder before us removed that file: lock the new one
    try:
        yield
    finally:
        # Removed while still held; a process waiting on the removed file finds it gone and locks a fresh one.
        path.unlink(missing_ok=True)
        os.close(descriptor)

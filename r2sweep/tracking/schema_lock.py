"""One process at a time creates or migrates a new SQLite tracking store's schema.

Two sweeps started together on a new file both ran MLflow's migrations, and one died
(``No such index ...``, or alembic's "expected to match one row"; issue 42). An
exclusive ``flock`` on a file beside the database serializes that first open. The
kernel releases it when its holder exits, so a crash never leaves it held, and the
holder removes the file when done, so nothing is left beside the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["sqlite_schema_lock"]


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

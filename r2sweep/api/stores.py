"""Opening an MLflow store for the faces: for reading (it must exist) and quietly.

A local SQLite store that is not there is an error, not a new empty file (a
reader with a typo in the path would otherwise create one and report "no such
sweep"); a tracking server is asked first whether it answers at all (one quick
try), so a wrong address fails in seconds instead of after MLflow's retries.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from r2sweep.api import options as check
from r2sweep.core.errors import R2SweepError

__all__ = ["open_store", "quiet_mlflow"]


def quiet_mlflow() -> None:
    """MLflow's chatter off: a new store's migration lines, a progress bar per downloaded artifact
    (noise on a terminal, and it would break "one line per error"; MLflow reads the setting per download).

    Called after MLflow is imported (it sets its loggers up on import).
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    importlib.import_module("mlflow")  # its loggers exist once it is imported

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def open_store(tracking_uri: str | None, option: str = "tracking_uri") -> Any:
    """A Tracker on an existing store, checked (``option`` is how an error names the argument).

    Raises:
        ConfigError: the URI is unusable; R2SweepError: no store at a local path;
        TrackingError: the server does not answer or refuses the credentials.
    """
    check.tracking_uri(tracking_uri, option)
    quiet_mlflow()
    from r2sweep.tracking.store import Tracker

    tracker = Tracker(tracking_uri)
    database = tracker.sqlite_file
    if database is not None and not database.is_file():
        raise R2SweepError(f"no MLflow store at {database} (run a sweep here first, or pass --tracking-uri)")
    tracker.check_access()
    return tracker

"""Where a local Ray keeps its session files: a folder short enough for Ray's Unix sockets.

Ray puts its session under ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else
``/tmp/ray``, and creates Unix sockets several levels below it
(``session_<date>_<time>_<usec>_<pid>/sockets/plasma_store``). A Unix socket
path is limited to 107 bytes on Linux, so a long ``TMPDIR`` (common on clusters
and HPC systems: ``/scratch/local/slurm-job-1234567/tmp``) makes ``ray.init``
fail with "AF_UNIX path length cannot exceed 107 bytes". r2sweep decides the
folder once, here, before Ray starts:

* ``RAY_TMPDIR`` set: used as given; too long is an error that says how long it may be;
* else Ray's own default, when it fits;
* else ``/tmp/ray`` (Ray's default without ``TMPDIR``), with a one-line note.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from r2sweep.core.errors import ConfigError

__all__ = ["SOCKET_PATH_LIMIT", "MAX_TEMP_DIR_LENGTH", "local_temp_dir"]

#: Linux's limit on a Unix socket path (``sun_path`` is 108 bytes with the final NUL).
SOCKET_PATH_LIMIT = 107
# The longest path Ray creates below its temp folder: a session folder named
# after the date, time, microseconds and a process id of up to 7 digits, then
# the plasma store's socket.
_LONGEST_BELOW = len("/session_2026-12-01_11-12-27_036605_4194304/sockets/plasma_store")
#: The longest temp folder (in bytes) that leaves room for Ray's sockets.
MAX_TEMP_DIR_LENGTH = SOCKET_PATH_LIMIT - _LONGEST_BELOW


def _fits(folder: str) -> bool:
    return len(folder.encode()) <= MAX_TEMP_DIR_LENGTH


def _say(line: str) -> None:
    print(f"r2sweep: {line}", file=sys.stderr, flush=True)


def local_temp_dir() -> str:
    """The folder a local ``ray.init`` should use as ``_temp_dir``.

    Raises:
        ConfigError: ``RAY_TMPDIR`` is set to a folder too long for Ray's sockets,
            or ``TMPDIR`` is too long and ``/tmp`` cannot be used instead.
    """
    explicit = os.environ.get("RAY_TMPDIR")
    if explicit:
        folder = os.path.join(os.path.abspath(explicit), "ray")
        if not _fits(folder):
            raise ConfigError(
                "RAY_TMPDIR", explicit,
                f"a folder whose path plus '/ray' has at most {MAX_TEMP_DIR_LENGTH} bytes (Ray's Unix sockets "
                f"below it are limited to {SOCKET_PATH_LIMIT}); set it to a short path such as /tmp",
            )
        return folder
    system = os.environ.get("TMPDIR") or "/tmp"
    folder = os.path.join(os.path.abspath(system), "ray")
    if _fits(folder):
        return folder
    fallback = "/tmp/ray"
    if not (os.path.isdir("/tmp") and os.access("/tmp", os.W_OK | os.X_OK)):
        raise ConfigError(
            "TMPDIR", system,
            f"a folder whose path plus '/ray' has at most {MAX_TEMP_DIR_LENGTH} bytes (Ray's Unix sockets below "
            f"it are limited to {SOCKET_PATH_LIMIT}), and /tmp is not writable here; set RAY_TMPDIR to a short folder",
        )
    Path(fallback).mkdir(parents=True, exist_ok=True)
    _say(f"TMPDIR is too long for Ray's socket paths ({len(folder.encode())} > {MAX_TEMP_DIR_LENGTH} bytes); "
         f"Ray's session files go to {fallback} (set RAY_TMPDIR to choose another folder)")
    return fallback

"""One owner per key: a lock file created exclusively and kept fresh by a heartbeat.

The trial that creates ``<key>.lock`` (``O_CREAT | O_EXCL``, atomic on every
POSIX file system, NFS v3+ included) pre-trains; the others wait for its entry.
An owner that dies never blocks them for long: a lock whose owner ran on this
host and whose process is gone is stale at once, any other lock once its
heartbeat (the file's modification time, touched every few seconds by a thread
that stops with the owning thread) is older than ``stale_after_s``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["Claim", "try_claim", "lock_holder", "is_stale", "owner_record", "died_on_this_host"]


def lock_holder(path: Path) -> dict[str, Any] | None:
    """What the lock file says about its owner (token, host, pid, label, started); None when absent or being written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def owner_record(token: str, label: str) -> dict[str, Any]:
    """What a lock (or an object store's lease) says about its owner."""
    return {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "label": label, "started": time.time()}


def died_on_this_host(holder: dict[str, Any] | None) -> bool:
    """Whether ``holder`` (an :func:`owner_record`) ran on this host and its process is gone."""
    pid = (holder or {}).get("pid")
    return (holder or {}).get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and _process_gone(pid)


def is_stale(path: Path, stale_after_s: float) -> bool:
    """Whether the lock's owner is dead: its process is gone (same host) or its heartbeat stopped."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return died_on_this_host(lock_holder(path)) or age > stale_after_s


class Claim:
    """The right to pre-train one key, held until :meth:`release` (or the owning thread's death)."""

    def __init__(self, path: Path, token: str, heartbeat_s: float) -> None:
        self.path = path
        self.token = token
        self.lost = False  # another process broke the lock (this owner was judged dead)
        self._stop = threading.Event()
        self._owner = threading.current_thread()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name=f"r2sweep-lock-{path.stem[:8]}")
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            if not self._owner.is_alive():
                return  # the owner vanished without releasing: let the lock go stale
            holder = lock_holder(self.path)
            if holder is None or holder.get("token") != self.token:
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:
                self.lost = True
                return

    def release(self) -> None:
        self._stop.set()
        holder = lock_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _break(path: Path, stale_token: str | None) -> None:
    """Remove a stale lock, unless another waiter replaced it with a live one meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else broke it first
    holder = lock_holder(aside)
    if holder is not None and holder.get("token") != stale_token:
        try:  # it was a fresh owner's lock: put it back (fails if a third one already claimed)
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def try_claim(path: Path, *, label: str, heartbeat_s: float = 5.0, stale_after_s: float = 60.0) -> Claim | None:
    """Claim ``path`` for this thread; None while a live owner holds it (a stale one is broken first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # at most one stale lock to break before trying again
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not is_stale(path, stale_after_s):
                return None
            holder = lock_holder(path)
            _break(path, holder.get("token") if holder else None)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(owner_record(token, label), handle)
        return Claim(path, token, heartbeat_s)
    return None

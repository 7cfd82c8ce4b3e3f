"""A durable, ordered journal of what the sweep must tell MLflow, replayed until MLflow has it.

A tracking server that goes away for a minute must not cost a metric, block
Tune's event loop or end the sweep. So the tracking callback never talks to
MLflow itself: it appends each operation (open a trial's run, log metrics, set
tags, log artifacts, end a run) to a JSON-lines file and returns at once; a
background thread applies the operations strictly in order. When MLflow fails,
the thread waits and retries the *same* operation, so nothing is skipped or
reordered; after a driver crash the file is still there and a resumed sweep
applies what was left.

Replaying an operation twice is harmless, which is what makes "at least once"
become "exactly once" in MLflow: a trial's run is found by its trial-id tag
before one is created, metrics carry the timestamp they were first logged with
(MLflow's SQL store ignores an exact duplicate), tags and artifacts overwrite.

Layout of the journal folder::

    journal.jsonl   one operation per line, fsynced
    applied         how many lines MLflow already has (written atomically)
    files/<n>/      copies of the artifacts of operation n, until it is applied
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from r2sweep.checkpoint import write_text_atomic

__all__ = ["TrackingJournal", "JournalFlusher"]

_log = logging.getLogger(__name__)


class TrackingJournal:
    """The operations not yet known to be in MLflow, on disk, in order."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lines = self.folder / "journal.jsonl"
        self._applied = self.folder / "applied"
        self._lock = threading.Lock()
        ops = self._read()
        self._count = len(ops)
        self._once = {op["once"] for op in ops if "once" in op}

    def append(
        self, op: str, files: Iterable[str | os.PathLike[str]] = (), once: str | None = None, **fields: Any
    ) -> bool:
        """Record one operation durably; ``files`` are copied, so they may vanish afterwards.

        ``once`` names an operation that must be recorded at most once, ever: a
        trial restored from an earlier checkpoint reports its last epochs again,
        and MLflow must still hold one value per epoch. Returns False when an
        operation with the same ``once`` was already recorded (nothing is written).
        """
        with self._lock:
            if once is not None:
                if once in self._once:
                    return False
                self._once.add(once)
                fields["once"] = once
            index = self._count
            copies = []
            for path in files:
                target = self.folder / "files" / str(index) / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                copies.append(str(target))
            entry = {"op": op, **fields, **({"files": copies} if copies else {})}
            line = json.dumps(entry, sort_keys=True, default=str)  # str: a numpy scalar in a config
            with open(self._lines, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self._count += 1
            return True

    def _read(self) -> list[dict[str, Any]]:
        if not self._lines.exists():
            return []
        ops = []
        for line in self._lines.read_text(encoding="utf-8").splitlines():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a crash mid-write: it was never acknowledged
        return ops

    def trials(self) -> set[str]:
        """Every trial id any recorded operation names."""
        with self._lock:
            return {op["trial"] for op in self._read() if "trial" in op}

    def applied(self) -> int:
        """How many operations MLflow already has."""
        try:
            return int(self._applied.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        """``(index, operation)`` for every operation not yet applied, in order."""
        with self._lock:
            ops = self._read()
        start = self.applied()
        return list(enumerate(ops))[start:]

    def mark_applied(self, index: int) -> None:
        """Operation ``index`` (and every one before it) is in MLflow; drop its file copies."""
        write_text_atomic(self._applied, str(index + 1))
        shutil.rmtree(self.folder / "files" / str(index), ignore_errors=True)


class JournalFlusher:
    """Applies a journal's pending operations in a background thread, retrying on failure.

    Args:
        journal: what to apply.
        apply: applies one operation to MLflow; raises when MLflow is unreachable.
        retry_s: pause before retrying a failed operation.
        report: receives one line when tracking pauses and one when it resumes.
    """

    def __init__(
        self,
        journal: TrackingJournal,
        apply: Callable[[dict[str, Any]], None],
        retry_s: float = 5.0,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.journal = journal
        self.apply = apply
        self.retry_s = retry_s
        self.report = report or _log.warning
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="r2sweep-tracking", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New operations were appended."""
        self._idle.clear()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            if self._apply_pending():
                self._idle.set()
                self._wake.wait(timeout=1.0)
            else:
                self._wake.wait(timeout=self.retry_s)

    def _apply_pending(self) -> bool:
        """True when everything is applied; False when an operation failed (retried later)."""
        for index, op in self.journal.pending():
            try:
                self.apply(op)
            except Exception as error:  # noqa: BLE001 - any failure means "not in MLflow yet"
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    self.report(f"tracking paused ({str(error)[:200]}); operations are kept in {self.journal.folder} and retried")
                self.last_error = str(error)
                return False
            if self.failing_since is not None:
                self.report(f"tracking resumed after {time.monotonic() - self.failing_since:.0f} s")
                self.failing_since = None
            self.journal.mark_applied(index)
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until every operation is applied (True) or ``timeout`` seconds pass (False)."""
        self.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic()))) and not self.journal.pending():
                return True
        return not self.journal.pending()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

"""A durable, ordered journal of what the sweep must tell MLflow, replayed until MLflow has it.

A tracking server that goes away for a minute must not cost a metric, block
Tune's event loop or end the sweep. So the tracking callback never talks to
MLflow itself: it appends each operation (open a trial's run, log metrics, set
tags, log artifacts, end a run) to a JSON-lines file and returns at once; a
background thread applies the operations strictly in order. When MLflow fails,
the thread waits and retries the *same* operation, so nothing is skipped or
reordered; after a driver crash the file is still there and a resumed sweep
applies what was left. The one exception is an operation MLflow refuses for
good (a client error such as a metric for a deleted run, see
:func:`r2sweep.tracking.errors.is_permanent`): retrying it would hold back every
later record forever, so it is written to ``rejected.jsonl`` with the reason,
reported once, and passed over.

Replaying an operation twice is harmless, which is what makes "at least once"
become "exactly once" in MLflow: a trial's run is found by its trial-id tag
before one is created, metrics carry the timestamp they were first logged with
(MLflow's SQL store ignores an exact duplicate), tags and artifacts overwrite.

Layout of the journal folder::

    journal.jsonl   one operation per line, fsynced
    applied         how many lines MLflow already has, and the byte offset where the next
                    one starts (written atomically): reading what is pending costs the
                    pending lines, not the whole journal, so a sweep's tracking cost per
                    trial stays flat however many trials came before
    files/<n>/      copies of the artifacts of operation n, until it is applied (kept if rejected)
    rejected.jsonl  the operations MLflow refused for good, each with its index and the reason
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

from r2sweep.core.checkpoint import write_text_atomic

__all__ = ["TrackingJournal", "JournalFlusher"]

_log = logging.getLogger(__name__)


def _read_lines_from(path: Path, offset: int) -> list[tuple[dict[str, Any], int]]:
    """``(entry, offset after its line)`` for each complete JSON line of ``path`` from byte
    ``offset``, up to the first torn one (a line still being written, or a crash's)."""
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    entries = []
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            break
        try:
            entries.append((json.loads(data[start:end]), offset + end + 1))
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        start = end + 1
    return entries


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path``, up to the first torn one."""
    return [entry for entry, _ in _read_lines_from(path, 0)]


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line a crash left without its newline (it was never acknowledged).

    Appended to, it would glue the next line onto itself, and the reader, which
    stops at the first unreadable line, would lose that line and every later one.
    """
    if not path.exists():
        return
    with open(path, "r+b") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


class TrackingJournal:
    """The operations not yet known to be in MLflow, on disk, in order."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lines = self.folder / "journal.jsonl"
        self._applied = self.folder / "applied"
        self.rejected_file = self.folder / "rejected.jsonl"
        self._lock = threading.Lock()
        _cut_torn_tail(self._lines)
        _cut_torn_tail(self.rejected_file)
        ops = self._read()
        self._count = len(ops)
        self._once = {op["once"] for op in ops if "once" in op}
        # Where each line read by pending() ends, so that mark_applied() records it.
        self._ends: dict[int, int] = {}

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
            _append_line(self._lines, json.dumps(entry, sort_keys=True, default=str))  # str: a numpy scalar
            self._count += 1
            return True

    def _read(self) -> list[dict[str, Any]]:
        return _read_lines(self._lines)

    def trials(self) -> set[str]:
        """Every trial id any recorded operation names."""
        with self._lock:
            return {op["trial"] for op in self._read() if "trial" in op}

    def _position(self) -> tuple[int, int]:
        """``(operations applied, byte offset of the first one not applied)``."""
        try:
            parts = self._applied.read_text().split()
            count = int(parts[0])
            if len(parts) > 1:
                return count, int(parts[1])
        except (FileNotFoundError, ValueError, IndexError):
            return 0, 0
        return count, self._end_of(count - 1)  # written before offsets were kept: read the lines once

    def _end_of(self, index: int) -> int:
        """The byte offset after line ``index`` (0 before the first), reading the whole journal."""
        ends = [end for _, end in _read_lines_from(self._lines, 0)]
        return ends[min(index, len(ends) - 1)] if index >= 0 and ends else 0

    def applied(self) -> int:
        """How many operations MLflow already has."""
        return self._position()[0]

    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        """``(index, operation)`` for every operation not yet applied, in order (reads only those)."""
        count, offset = self._position()
        with self._lock:
            entries = _read_lines_from(self._lines, offset)
            self._ends = {count + i: end for i, (_, end) in enumerate(entries)}
        return [(count + i, op) for i, (op, _) in enumerate(entries)]

    def mark_applied(self, index: int, keep_files: bool = False) -> None:
        """Operation ``index`` (and every one before it) is done with; drop its file copies unless ``keep_files``."""
        with self._lock:
            end = self._ends.pop(index, None)
        if end is None:  # not read by pending(): find where its line ends
            end = self._end_of(index)
        write_text_atomic(self._applied, f"{index + 1} {end}")
        if not keep_files:
            shutil.rmtree(self.folder / "files" / str(index), ignore_errors=True)

    def reject(self, index: int, op: dict[str, Any], reason: str) -> None:
        """Record durably that MLflow refused operation ``index`` for good (once per index)."""
        with self._lock:
            if any(entry["index"] == index for entry in self.rejected()):
                return  # a crash came between recording it and marking it applied
            _append_line(self.rejected_file, json.dumps({"index": index, "op": op, "reason": reason}, sort_keys=True, default=str))

    def rejected(self) -> list[dict[str, Any]]:
        """The refused operations, oldest first: ``{"index", "op", "reason"}`` each."""
        # A torn last line: the operation is still pending, and is rejected again.
        return _read_lines(self.rejected_file)


class JournalFlusher:
    """Applies a journal's pending operations in a background thread, retrying on failure.

    Args:
        journal: what to apply.
        apply: applies one operation to MLflow; raises when MLflow is unreachable.
        retry_s: pause before retrying a failed operation.
        report: receives one line when tracking pauses, one when it resumes, and
            one for each operation MLflow refused for good.
        permanent: tells a refusal for good from a failure worth retrying; default
            :func:`r2sweep.tracking.errors.is_permanent`.
    """

    def __init__(
        self,
        journal: TrackingJournal,
        apply: Callable[[dict[str, Any]], None],
        retry_s: float = 5.0,
        report: Callable[[str], None] | None = None,
        permanent: Callable[[BaseException], bool] | None = None,
    ) -> None:
        if permanent is None:
            from r2sweep.tracking.errors import is_permanent  # imports MLflow: only when it is needed

            permanent = is_permanent
        self.journal = journal
        self.apply = apply
        self.retry_s = retry_s
        self.report = report or _log.warning
        self.permanent = permanent
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
        """True when everything is applied (or rejected); False when an operation failed (retried later)."""
        for index, op in self.journal.pending():
            rejected = False
            try:
                self.apply(op)
            except Exception as error:  # noqa: BLE001 - any failure means "not in MLflow yet"
                if not self.permanent(error):
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                        self.report(f"tracking paused ({str(error)[:200]}); operations are kept in {self.journal.folder} and retried")
                    self.last_error = str(error)
                    return False
                rejected = True
                self.journal.reject(index, op, str(error))
                self.report(f"MLflow refused tracking operation {index} ({_describe(op)}) for good, skipped; "
                            f"kept in {self.journal.rejected_file}: {str(error)[:300]}")
            if self.failing_since is not None:  # MLflow answered again, even if with a refusal
                self.report(f"tracking resumed after {time.monotonic() - self.failing_since:.0f} s")
                self.failing_since = None
            # A refused operation's files stay: rejected.jsonl names them, for whoever repairs it.
            self.journal.mark_applied(index, keep_files=rejected)
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


def _describe(op: dict[str, Any]) -> str:
    return op["op"] + (f" of trial {op['trial']}" if "trial" in op else "")

"""The tracking journal: durable, ordered, replayed from where it stopped."""

from __future__ import annotations

import threading
from pathlib import Path

from r2sweep.tracking.journal import JournalFlusher, TrackingJournal


def test_operations_survive_a_restart_in_order_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    artifact = tmp_path / "weights.png"
    artifact.write_bytes(b"png")
    journal = TrackingJournal(tmp_path / "j")
    journal.append("trial", trial="t0", params={"r2.kind": "linf"})
    journal.append("artifacts", trial="t0", files=[artifact])
    journal.append("metrics", trial="t0", metrics={"val/top1": 50.0}, step=0, timestamp=1)
    artifact.unlink()  # the journal kept its own copy
    journal.mark_applied(0)
    with open(tmp_path / "j" / "journal.jsonl", "a") as handle:
        handle.write('{"op": "metr')  # a crash mid-write

    reopened = TrackingJournal(tmp_path / "j")
    pending = reopened.pending()
    assert [(i, op["op"]) for i, op in pending] == [(1, "artifacts"), (2, "metrics")]
    (copy,) = pending[0][1]["files"]
    assert Path(copy).read_bytes() == b"png"
    reopened.mark_applied(1)
    assert not Path(copy).exists()  # copies go once MLflow has them
    assert [i for i, _ in reopened.pending()] == [2]


def test_the_flusher_retries_the_failing_operation_and_applies_each_once_in_order(tmp_path: Path) -> None:
    journal = TrackingJournal(tmp_path)
    applied: list[int] = []
    failures = {"left": 3}
    lock = threading.Lock()

    def apply(op: dict) -> None:
        with lock:
            if op["n"] == 2 and failures["left"] > 0:
                failures["left"] -= 1
                raise ConnectionError("tracking server down")
            applied.append(op["n"])

    lines: list[str] = []
    flusher = JournalFlusher(journal, apply, retry_s=0.05, report=lines.append)
    for n in range(5):
        journal.append("metrics", n=n)
        flusher.notify()
    assert flusher.flush(timeout=30)
    flusher.close()
    assert applied == [0, 1, 2, 3, 4]
    assert failures["left"] == 0
    assert lines[0].startswith("tracking paused (tracking server down)") and lines[1].startswith("tracking resumed")
    assert journal.pending() == [] and journal.applied() == 5


def test_an_operation_marked_once_is_recorded_once_even_across_restarts(tmp_path: Path) -> None:
    journal = TrackingJournal(tmp_path)
    assert journal.append("metrics", once="t0:epoch:3", step=3, metrics={"val/top1": 50.0})
    # The trial was restored from its epoch-2 checkpoint and reports epoch 3 again.
    assert not journal.append("metrics", once="t0:epoch:3", step=3, metrics={"val/top1": 51.0})
    assert not TrackingJournal(tmp_path).append("metrics", once="t0:epoch:3", step=3, metrics={})
    assert [op["metrics"] for _, op in TrackingJournal(tmp_path).pending()] == [{"val/top1": 50.0}]


def test_an_operation_appended_after_a_torn_line_is_kept(tmp_path: Path) -> None:
    journal = TrackingJournal(tmp_path)
    journal.append("metrics", n=0)
    with open(tmp_path / "journal.jsonl", "a") as handle:
        handle.write('{"op": "metr')  # the driver crashed mid-write
    resumed = TrackingJournal(tmp_path)  # the resumed driver records more
    resumed.append("metrics", n=1)
    resumed.append("metrics", n=2)
    assert [(i, op["n"]) for i, op in TrackingJournal(tmp_path).pending()] == [(0, 0), (1, 1), (2, 2)]


def test_a_refused_operation_is_recorded_once_with_its_files(tmp_path: Path) -> None:
    artifact = tmp_path / "pretrained.pt"
    artifact.write_bytes(b"weights")
    journal = TrackingJournal(tmp_path / "j")
    journal.append("artifacts", trial="t0", files=[artifact])
    (_, op), = journal.pending()
    journal.reject(0, op, "RESOURCE_DOES_NOT_EXIST: no run")
    journal.reject(0, op, "RESOURCE_DOES_NOT_EXIST: no run")  # again, after a crash before mark_applied
    journal.mark_applied(0, keep_files=True)
    assert TrackingJournal(tmp_path / "j").rejected() == [{"index": 0, "op": op, "reason": "RESOURCE_DOES_NOT_EXIST: no run"}]
    assert Path(op["files"][0]).read_bytes() == b"weights"  # what MLflow refused can still be repaired by hand
    assert journal.pending() == []


def test_pending_reads_only_what_is_not_applied_and_an_old_applied_file_still_reads(tmp_path: Path) -> None:
    journal = TrackingJournal(tmp_path)
    for n in range(6):
        journal.append("metrics", trial="t0", n=n)
    for index, _ in journal.pending()[:4]:
        journal.mark_applied(index)
    lines = tmp_path / "journal.jsonl"
    data = lines.read_bytes()
    cut = sum(len(line) + 1 for line in data.split(b"\n")[:4])
    # The applied lines overwritten with bytes no JSON reader takes: pending() never reads them
    # (opening a journal reads it all once; each flush after that reads what is pending).
    lines.write_bytes(b"\xff" * (cut - 1) + b"\n" + data[cut:])
    assert [(i, op["n"]) for i, op in journal.pending()] == [(4, 4), (5, 5)]
    lines.write_bytes(data)
    (tmp_path / "applied").write_text("4")  # as written before offsets were kept
    reopened = TrackingJournal(tmp_path)
    assert [(i, op["n"]) for i, op in reopened.pending()] == [(4, 4), (5, 5)] and reopened.applied() == 4
    reopened.mark_applied(4)
    assert [i for i, _ in TrackingJournal(tmp_path).pending()] == [5]

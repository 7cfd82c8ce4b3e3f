"""What :mod:`.store` asks of the storage under a pre-training cache: a local folder
(:mod:`.folder`) or an S3 bucket prefix (:mod:`.objects`).

The layout (which names hold what) is :mod:`.store`'s alone; a backend only knows
how to read, write, list and delete relative, ``/``-separated names
(``entries/<key>/manifest.json``) and how to make an entry appear whole. Each is
built with the name of an entry's manifest (``marker``): the file a reader takes as
the proof that the entry is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = ["Item", "Stage", "Files", "Lock", "StorageError"]


class StorageError(OSError):
    """The storage failed (could not be reached, refused), not an entry in it: never a reason to delete an entry."""


@dataclass(frozen=True)
class Item:
    """One file of a listing: its name relative to the folder listed, its size and modification time."""

    name: str
    size: int
    mtime: float


class Lock(Protocol):
    """The right to pre-train one key (:class:`.lock.Claim`, :class:`.lease.Lease`)."""

    lost: bool

    def release(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> None: ...


class Stage(Protocol):
    """An entry being written, which no reader sees before :meth:`publish`."""

    #: The name the weights get inside the entry (recorded in the manifest).
    weights: str

    def save(self, state: dict[str, Any]) -> str:
        """Write the weights (``torch.save``); returns their SHA-256."""

    def touch(self, name: str) -> None:
        """An empty file ``name`` in the entry."""

    def publish(self, manifest: bytes) -> bool:
        """Make the entry, with ``manifest`` as its marker, appear whole.

        False: an entry is there already (it is left as it is; the caller decides whether to replace
        it, by discarding it and publishing again).
        """

    def close(self) -> None:
        """Remove what was written unless it was published."""


class Files(Protocol):
    """The storage operations of a cache's root (see the module's docstring)."""

    @property
    def root(self) -> Path | str:
        """The folder, or the ``s3://`` URI."""

    def location(self, name: str) -> Path | str:
        """Where ``name`` is, for people: a path, or a URI."""

    def read(self, name: str) -> bytes | None:
        """The content of ``name``; None when there is none."""

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` whole (readers see the old content or the new one)."""

    def touch(self, name: str) -> None:
        """An empty ``name`` whose modification time is now (its folder must exist, where there are folders)."""

    def delete(self, name: str) -> None:
        """Remove ``name`` if it is there."""

    def committed(self, folder: str) -> bool:
        """Whether an entry was published in ``folder`` (complete or not: a reader verifies it)."""

    def verified(self, name: str, sha256: str) -> str | os.PathLike[str] | IO[bytes] | None:
        """``name`` to load with ``torch.load`` when its SHA-256 is ``sha256``; None otherwise."""

    def remove(self, folder: str) -> None:
        """Delete an entry: its marker first, so that no reader sees it half-deleted."""

    def stage(self, folder: str) -> Stage:
        """Start writing the entry ``folder``."""

    def listing(self, folder: str) -> list[Item]:
        """Every file under ``folder``, at any depth (none when it does not exist)."""

    def remove_leftovers(self, folder: str, max_age_s: float) -> None:
        """Delete what writers that died mid-write left under ``folder``, once older than ``max_age_s``."""

    def claim(self, name: str, *, label: str, heartbeat_s: float, stale_after_s: float) -> Lock | None:
        """The lock ``name`` for this thread; None while a live owner holds it (a stale one is broken first)."""

    def holder(self, name: str) -> dict[str, Any] | None:
        """What the lock ``name`` says about its owner; None when there is none."""

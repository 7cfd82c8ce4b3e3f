"""A pre-training cache in a local (or shared, mounted) folder: :class:`.backend.Files` on files.

An entry is built in a temporary folder beside the others (``.building-*``) and
renamed into place, so a reader sees all of it or nothing: here the entry's folder
appearing is the commit, and a folder without a readable manifest is a damaged
entry. Deleting renames it aside first (``.discard-*``) for the same reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from r2sweep.core.checkpoint import save_atomic, save_bytes_atomic
from r2sweep.core.pretrain_cache.backend import Item
from r2sweep.core.pretrain_cache.lock import Claim, lock_holder, try_claim

__all__ = ["LocalFolder"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Building:
    """An entry written in ``.building-<name>-<random>`` and renamed to its place by :meth:`publish`."""

    weights = "weights.pt"

    def __init__(self, target: Path, marker: str) -> None:
        self.target = target
        self.marker = marker
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = target.with_name(f".building-{target.name}-{uuid.uuid4().hex[:8]}")
        self.path.mkdir()

    def save(self, state: dict[str, Any]) -> str:
        save_atomic(state, self.path / self.weights)
        return _sha256(self.path / self.weights)

    def touch(self, name: str) -> None:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        (self.path / name).touch()

    def publish(self, manifest: bytes) -> bool:
        save_bytes_atomic(self.path / self.marker, manifest)
        try:
            os.rename(self.path, self.target)
        except OSError:
            if self.target.exists():
                return False  # someone's entry is there (a folder is not replaced by rename)
            raise
        return True

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # nothing left once renamed


class LocalFolder:
    """The cache's files under the folder ``root``."""

    def __init__(self, root: str | os.PathLike[str], marker: str) -> None:
        self.root = Path(root)
        self.marker = marker

    def location(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except OSError:
            return None

    def write(self, name: str, data: bytes) -> None:
        save_bytes_atomic(self.root / name, data)

    def touch(self, name: str) -> None:
        path = self.root / name
        path.parent.mkdir(exist_ok=True)  # not parents: the entry's folder must still be there
        path.touch()

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def committed(self, folder: str) -> bool:
        return (self.root / folder).is_dir()

    def verified(self, name: str, sha256: str) -> Path | None:
        path = self.root / name
        return path if path.is_file() and _sha256(path) == sha256 else None

    def remove(self, folder: str) -> None:
        path = self.root / folder
        aside = path.with_name(f".discard-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def stage(self, folder: str) -> _Building:
        return _Building(self.root / folder, self.marker)

    def listing(self, folder: str) -> list[Item]:
        base = self.root / folder
        items = []
        for path in base.rglob("*") if base.is_dir() else ():
            try:
                if path.is_file():
                    stat = path.stat()
                    items.append(Item(path.relative_to(base).as_posix(), stat.st_size, stat.st_mtime))
            except FileNotFoundError:
                continue  # deleted while listed
        return items

    def remove_leftovers(self, folder: str, max_age_s: float) -> None:
        # Writers that died mid-write leave their build folders; a discard that died, its folder aside.
        base = self.root / folder
        now = time.time()
        for leftover in base.glob(".*") if base.is_dir() else ():
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)

    def claim(self, name: str, *, label: str, heartbeat_s: float, stale_after_s: float) -> Claim | None:
        return try_claim(self.root / name, label=label, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)

    def holder(self, name: str) -> dict[str, Any] | None:
        return lock_holder(self.root / name)

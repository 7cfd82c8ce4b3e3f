"""The pre-training cache on disk: entries written atomically, verified on every read.

Layout under the cache's root (the sweep storage's ``pretrain_cache/`` by default)::

    entries/<key>/weights.pt      the pre-trained state dict and the RNG state after pre-training
    entries/<key>/manifest.json   the key's material, the weights' SHA-256, the per-epoch history
                                  (and the grid its ``proxy/top1`` was measured on), what the
                                  pre-training cost and which trial made it
    entries/<key>/used_by/<sweep> one empty file per sweep that took the entry (its time: the last use)
    locks/<key>.lock              held by the trial pre-training that key now (:mod:`.lock`)
    progress/<key>.json           that trial's epochs so far (and its proxy's grid), for the trials
                                  waiting on it

An entry is built in a temporary folder beside ``entries/`` and renamed into
place, so a reader sees all of it or nothing. A manifest that does not parse,
names another key, or whose weights' hash differs is a torn or corrupt entry: it
is moved aside and deleted, and the trial pre-trains as if there was none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2sweep.core.checkpoint import load_checkpoint, save_atomic, write_text_atomic
from r2sweep.core.pretrain_cache.key import CacheKey
from r2sweep.core.pretrain_cache.lock import Claim, lock_holder, try_claim

__all__ = ["PretrainCache", "Entry", "EntryInfo", "Epochs", "ENTRY_FORMAT", "UNRECORDED"]

ENTRY_FORMAT = 1
#: The proxy grid of a history written before entries recorded it: equal to no trial's grid.
UNRECORDED = "unrecorded"
_WEIGHTS = "weights.pt"
_MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120] or "_"


@dataclass
class Epochs:
    """Per-epoch metrics and the grid their ``proxy/top1`` was measured on (see ``pretraining.proxy_grid``)."""

    history: list[dict[str, float]]
    proxy: Any = UNRECORDED


@dataclass
class Entry:
    """A verified entry: what a trial served from the cache needs."""

    key: str
    model_state: dict[str, Any]
    rng_state: dict[str, Any]
    epochs: Epochs
    pretrain_s: float
    source: str


@dataclass
class EntryInfo:
    """One entry as ``r2sweep cache list`` shows it."""

    key: str
    path: Path
    size_bytes: int
    created: float
    last_used: float
    used_by: list[str]
    source: str
    summary: str
    pretrain_s: float


class PretrainCache:
    """A folder of pre-training entries that every trial of every sweep pointing at it shares.

    Args:
        root: the folder (on storage every node mounts, for a cluster).
        user: the sweep taking entries (recorded under ``used_by``).
        stale_after_s: how long a lock's heartbeat may be silent before its owner counts as dead.
        heartbeat_s: how often an owner touches its lock.
        poll_s: how often a waiting trial looks for the entry.
    """

    def __init__(self, root: str | os.PathLike[str], *, user: str = "", stale_after_s: float = 60.0,
                 heartbeat_s: float = 5.0, poll_s: float = 0.5) -> None:
        self.root = Path(root)
        self.user = user
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s

    def _entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    def _lock(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.lock"

    def _progress(self, key: str) -> Path:
        return self.root / "progress" / f"{key}.json"

    # -- reading -------------------------------------------------------------

    def _manifest(self, folder: Path, key: str) -> dict[str, Any] | None:
        try:
            manifest = json.loads((folder / _MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("format") != ENTRY_FORMAT or manifest.get("key") != key:
            return None
        return manifest

    def lookup(self, key: str) -> Entry | None:
        """The verified entry of ``key``; None when there is none (a corrupt one is deleted first)."""
        folder = self._entry_dir(key)
        if not folder.is_dir():
            return None
        manifest = self._manifest(folder, key)
        weights = folder / _WEIGHTS
        try:
            intact = manifest is not None and weights.is_file() and _sha256(weights) == manifest["weights_sha256"]
            state = load_checkpoint(weights) if intact else None
        except Exception:  # noqa: BLE001 - a file that hashes right but does not load is corrupt too
            state = None
        if manifest is None or state is None:
            self.discard(key)
            return None
        if self.user:
            used = folder / "used_by" / _safe(self.user)
            used.parent.mkdir(exist_ok=True)
            used.touch()
        return Entry(key, state["model"], state["rng"], Epochs(manifest["history"], manifest.get("proxy", UNRECORDED)),
                     float(manifest["pretrain_s"]), manifest.get("source", ""))

    def discard(self, key: str) -> None:
        """Delete ``key``'s entry (moved aside first, so no reader sees it half-deleted)."""
        folder = self._entry_dir(key)
        aside = folder.with_name(f".discard-{key}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    # -- owning a key --------------------------------------------------------

    def claim(self, key: str, label: str) -> Claim | None:
        """The right to pre-train ``key`` (None while a live trial holds it)."""
        return try_claim(self._lock(key), label=label, heartbeat_s=self.heartbeat_s, stale_after_s=self.stale_after_s)

    def holder(self, key: str) -> str:
        """Who holds ``key``'s lock now (its label), or ''."""
        holder = lock_holder(self._lock(key))
        return str(holder.get("label", "")) if holder else ""

    def publish_progress(self, key: str, epochs: Epochs) -> None:
        write_text_atomic(self._progress(key), json.dumps({"proxy": epochs.proxy, "history": epochs.history}))

    def progress(self, key: str) -> Epochs:
        """The epochs the owner of ``key`` has finished so far."""
        try:
            published = json.loads(self._progress(key).read_text())
        except (OSError, ValueError):
            return Epochs([])
        if isinstance(published, list):  # written before progress recorded its grid
            return Epochs(published)
        return Epochs(published["history"], published.get("proxy", UNRECORDED))

    def store(self, key: CacheKey, *, model_state: dict[str, Any], rng_state: dict[str, Any],
              epochs: Epochs, pretrain_s: float, source: str, summary: str) -> None:
        """Write ``key``'s entry atomically (a complete entry already there is kept)."""
        entries = self.root / "entries"
        entries.mkdir(parents=True, exist_ok=True)
        building = entries / f".building-{key.digest}-{uuid.uuid4().hex[:8]}"
        building.mkdir()
        try:
            save_atomic({"model": model_state, "rng": rng_state}, building / _WEIGHTS)
            manifest = {"format": ENTRY_FORMAT, "key": key.digest, "material": key.material,
                        "weights_sha256": _sha256(building / _WEIGHTS), "history": epochs.history, "proxy": epochs.proxy,
                        "pretrain_s": pretrain_s, "created": time.time(), "source": source, "summary": summary}
            write_text_atomic(building / _MANIFEST, json.dumps(manifest, indent=1, default=str))
            if self.user:
                (building / "used_by").mkdir()
                (building / "used_by" / _safe(self.user)).touch()
            try:
                os.rename(building, self._entry_dir(key.digest))
            except OSError:
                if self.lookup(key.digest) is None:  # what is there is corrupt: replace it
                    os.rename(building, self._entry_dir(key.digest))
        finally:
            shutil.rmtree(building, ignore_errors=True)
        self._progress(key.digest).unlink(missing_ok=True)

    # -- the CLI's view ------------------------------------------------------

    def entries(self) -> list[EntryInfo]:
        """Every complete entry, newest use first."""
        out = []
        for folder in sorted((self.root / "entries").glob("*")) if (self.root / "entries").is_dir() else ():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            manifest = self._manifest(folder, folder.name)
            if manifest is None:
                continue
            used = sorted((folder / "used_by").glob("*"), key=lambda p: p.stat().st_mtime) if (folder / "used_by").is_dir() else []
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            last = max([manifest["created"], *(p.stat().st_mtime for p in used)])
            out.append(EntryInfo(folder.name, folder, size, manifest["created"], last, [p.name for p in used],
                                 manifest.get("source", ""), manifest.get("summary", ""), float(manifest["pretrain_s"])))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def prune(self, *, older_than_s: float | None = None, keep_bytes: int | None = None,
              dry_run: bool = False) -> list[EntryInfo]:
        """Delete entries unused for ``older_than_s``, then the least recently used beyond ``keep_bytes``.

        Leftovers of writers that died mid-write (``.building-*``, ``.discard-*``) go too. Returns what
        was (or, with ``dry_run``, would be) deleted.
        """
        now = time.time()
        doomed: list[EntryInfo] = []
        kept = 0
        for info in self.entries():  # newest use first: the size budget keeps the recent ones
            old = older_than_s is not None and now - info.last_used > older_than_s
            over = keep_bytes is not None and kept + info.size_bytes > keep_bytes
            if old or over:
                doomed.append(info)
            else:
                kept += info.size_bytes
        if not dry_run:
            for info in doomed:
                self.discard(info.key)
            for leftover in (self.root / "entries").glob(".*") if (self.root / "entries").is_dir() else ():
                if now - leftover.stat().st_mtime > 3600:
                    shutil.rmtree(leftover, ignore_errors=True)
        return doomed

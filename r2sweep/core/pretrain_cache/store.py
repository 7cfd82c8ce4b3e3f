"""The pre-training cache: entries written atomically, verified on every read.

Its root is a folder (the sweep storage's ``pretrain_cache/`` by default, :mod:`.folder`)
or an S3 prefix ``s3://bucket/prefix`` (:mod:`.objects`). This module decides the
layout under it and what makes an entry valid; the backend only stores. The layout::

    entries/<key>/weights.pt      the pre-trained state dict and the RNG state after pre-training
                                  (on S3 ``weights-<random>.pt``: the manifest names it)
    entries/<key>/manifest.json   the key's material, the weights' SHA-256, the per-epoch history
                                  (and the grid its ``proxy/top1`` was measured on), what the
                                  pre-training cost and which trial made it
    entries/<key>/used_by/<sweep> one empty file per sweep that took the entry (its time: the last use)
    locks/<key>.lock              held by the trial pre-training that key now (:mod:`.lock`, :mod:`.lease`)
    progress/<key>.json           that trial's epochs so far (and its proxy's grid), for the trials
                                  waiting on it

An entry appears whole or not at all: in a folder it is built beside ``entries/``
and renamed into place; on S3 its manifest is written last, only if there is none.
A manifest that does not parse, names another key, or whose weights' hash differs
is a torn or corrupt entry: it is deleted, and the trial pre-trains as if there was none.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2sweep.core.checkpoint import load_checkpoint
from r2sweep.core.locations import is_uri
from r2sweep.core.pretrain_cache.backend import Files, Item, Lock, StorageError
from r2sweep.core.pretrain_cache.folder import LocalFolder
from r2sweep.core.pretrain_cache.key import CacheKey

__all__ = ["PretrainCache", "Entry", "EntryInfo", "Epochs", "ENTRY_FORMAT", "UNRECORDED"]

ENTRY_FORMAT = 1
#: The proxy grid of a history written before entries recorded it: equal to no trial's grid.
UNRECORDED = "unrecorded"
_WEIGHTS = "weights.pt"  # the weights' name in a manifest that names none (a folder's)
_MANIFEST = "manifest.json"
#: Left by writers that died mid-write: deleted by prune once this old.
_LEFTOVER_AGE_S = 3600


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
    path: Path | str  # a folder, or an s3:// URI
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
        root: the folder (on storage every node mounts, for a cluster), or an S3 prefix
            ``s3://bucket/prefix`` (endpoint and credentials from the environment, :mod:`.objects`).
        user: the sweep taking entries (recorded under ``used_by``).
        stale_after_s: how long a lock's heartbeat may be silent before its owner counts as dead.
        heartbeat_s: how often an owner touches its lock.
        poll_s: how often a waiting trial looks for the entry.
    """

    def __init__(self, root: str | os.PathLike[str], *, user: str = "", stale_after_s: float = 60.0,
                 heartbeat_s: float = 5.0, poll_s: float = 0.5) -> None:
        if is_uri(root):
            from r2sweep.core.pretrain_cache.objects import ObjectFolder  # boto3: only for an s3:// cache

            self._files: Files = ObjectFolder(str(root), _MANIFEST)
        else:
            self._files = LocalFolder(root, _MANIFEST)
        self.root = self._files.root
        self.user = user
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s

    # The layout, relative to the root.

    def _entry_dir(self, key: str) -> str:
        return f"entries/{key}"

    def _lock(self, key: str) -> str:
        return f"locks/{key}.lock"

    def _progress(self, key: str) -> str:
        return f"progress/{key}.json"

    # -- reading -------------------------------------------------------------

    def _manifest(self, folder: str, key: str) -> dict[str, Any] | None:
        try:  # a storage that fails raises (StorageError): that says nothing about the entry
            manifest = json.loads(self._files.read(f"{folder}/{_MANIFEST}") or b"")
        except ValueError:
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != ENTRY_FORMAT or manifest.get("key") != key:
            return None
        return manifest

    def lookup(self, key: str) -> Entry | None:
        """The verified entry of ``key``; None when there is none (a corrupt one is deleted first)."""
        folder = self._entry_dir(key)
        if not self._files.committed(folder):
            return None
        manifest = self._manifest(folder, key)
        weights = str(manifest.get("weights", _WEIGHTS)) if manifest is not None else ""
        try:  # a name inside the entry (never a path out of it) holding the bytes its writer hashed, loadable
            intact = manifest is not None and weights == _safe(weights) and not weights.startswith(".")
            source = self._files.verified(f"{folder}/{weights}", manifest["weights_sha256"]) if intact else None
            state = load_checkpoint(source) if source is not None else None
        except StorageError:
            raise  # the storage failed, not the entry: the caller decides (the trial trains without the cache)
        except Exception:  # noqa: BLE001 - a file that hashes right but does not load is corrupt too
            state = None
        if manifest is None or state is None:
            self.discard(key)
            return None
        if self.user:
            self._files.touch(f"{folder}/used_by/{_safe(self.user)}")
        return Entry(key, state["model"], state["rng"], Epochs(manifest["history"], manifest.get("proxy", UNRECORDED)),
                     float(manifest["pretrain_s"]), manifest.get("source", ""))

    def discard(self, key: str) -> None:
        """Delete ``key``'s entry (its manifest first, so no reader sees it half-deleted)."""
        self._files.remove(self._entry_dir(key))

    # -- owning a key --------------------------------------------------------

    def claim(self, key: str, label: str) -> Lock | None:
        """The right to pre-train ``key`` (None while a live trial holds it)."""
        return self._files.claim(self._lock(key), label=label, heartbeat_s=self.heartbeat_s,
                                 stale_after_s=self.stale_after_s)

    def holder(self, key: str) -> str:
        """Who holds ``key``'s lock now (its label), or ''."""
        holder = self._files.holder(self._lock(key))
        return str(holder.get("label", "")) if holder else ""

    def publish_progress(self, key: str, epochs: Epochs) -> None:
        self._files.write(self._progress(key), json.dumps({"proxy": epochs.proxy, "history": epochs.history}).encode())

    def progress(self, key: str) -> Epochs:
        """The epochs the owner of ``key`` has finished so far."""
        try:
            published = json.loads(self._files.read(self._progress(key)) or b"")
        except (OSError, ValueError):
            return Epochs([])
        if isinstance(published, list):  # written before progress recorded its grid
            return Epochs(published)
        return Epochs(published["history"], published.get("proxy", UNRECORDED))

    def store(self, key: CacheKey, *, model_state: dict[str, Any], rng_state: dict[str, Any],
              epochs: Epochs, pretrain_s: float, source: str, summary: str) -> None:
        """Write ``key``'s entry atomically (a complete entry already there is kept)."""
        stage = self._files.stage(self._entry_dir(key.digest))
        try:
            digest = stage.save({"model": model_state, "rng": rng_state})
            manifest = {"format": ENTRY_FORMAT, "key": key.digest, "material": key.material, "weights": stage.weights,
                        "weights_sha256": digest, "history": epochs.history, "proxy": epochs.proxy,
                        "pretrain_s": pretrain_s, "created": time.time(), "source": source, "summary": summary}
            text = json.dumps(manifest, indent=1, default=str).encode()
            if self.user:
                stage.touch(f"used_by/{_safe(self.user)}")
            if not stage.publish(text) and self.lookup(key.digest) is None:
                stage.publish(text)  # what was there was corrupt (and is deleted now): replace it
        finally:
            stage.close()
        self._files.delete(self._progress(key.digest))

    # -- the CLI's view ------------------------------------------------------

    def entries(self) -> list[EntryInfo]:
        """Every complete entry, newest use first."""
        files: dict[str, list[Item]] = {}
        for item in self._files.listing("entries"):
            key, inside, _ = item.name.partition("/")
            if inside and not key.startswith("."):  # not a writer's build folder
                files.setdefault(key, []).append(item)
        out = []
        for key in sorted(files):
            folder = self._entry_dir(key)
            manifest = self._manifest(folder, key)
            if manifest is None:
                continue
            used = sorted((i for i in files[key] if i.name.startswith(f"{key}/used_by/")), key=lambda i: i.mtime)
            size = sum(i.size for i in files[key])
            last = max([manifest["created"], *(i.mtime for i in used)])
            out.append(EntryInfo(key, self._files.location(folder), size, manifest["created"], last,
                                 [i.name.rsplit("/", 1)[-1] for i in used], manifest.get("source", ""),
                                 manifest.get("summary", ""), float(manifest["pretrain_s"])))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def prune(self, *, older_than_s: float | None = None, keep_bytes: int | None = None,
              dry_run: bool = False) -> list[EntryInfo]:
        """Delete entries unused for ``older_than_s``, then the least recently used beyond ``keep_bytes``.

        Leftovers of writers that died mid-write (``.building-*``, ``.discard-*``; on S3 entries without
        a manifest) go too, once an hour old. Returns what was (or, with ``dry_run``, would be) deleted.
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
            self._files.remove_leftovers("entries", _LEFTOVER_AGE_S)
        return doomed

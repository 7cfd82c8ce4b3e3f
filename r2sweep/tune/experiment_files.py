"""The files r2sweep keeps in, and mends in, a Tune experiment folder: local or at a storage URI.

A sweep's Tune state lives in ``<storage>/<name>``: a local folder, or a URI
(``s3://``, ``gs://``, ``file://``, anything pyarrow has a file system for,
which is what Ray itself uses). Everything r2sweep does there goes through one
pyarrow file system, so a sweep on shared storage gets the same guarantees as a
local one:

* the search space it started with (:data:`SPACE_FILE`): a resume with another
  space is refused, naming the first field that differs;
* an atomically written copy of Tune's ``tuner.pkl``, and the repairs of what a
  driver killed mid-write can leave (:func:`repair_experiment`).

These repairs were found against Ray 2.60's layout of an experiment folder
(``tuner.pkl``, ``experiment_state-<time>.json``, ``<trial>/checkpoint_NNNNNN``);
they only ever act on files of those names.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from r2sweep.core.checkpoint import save_bytes_atomic
from r2sweep.core.locations import is_uri

__all__ = ["ExperimentFolder", "SPACE_FILE"]

#: The space a sweep was started with, beside Tune's state: a resume must use the same one.
SPACE_FILE = "r2sweep_space.json"
_TUNER_STATE = "tuner.pkl"
_TUNER_BACKUP = "r2sweep_tuner.pkl"


class ExperimentFolder:
    """One Tune experiment folder, ``experiment`` being a local path or a storage URI."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self.local = not is_uri(experiment)
        if self.local:
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = os.path.abspath(experiment)
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(experiment)
        self.root = self.root.rstrip("/")

    def _path(self, *names: str) -> str:
        return "/".join([self.root, *names])

    # -- small file operations -------------------------------------------------

    def read(self, *names: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self._path(*names)) as stream:
                return stream.read()
        except (FileNotFoundError, OSError):
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` so that a reader sees the old file or the new one, never a torn one."""
        if self.local:
            save_bytes_atomic(self._path(name), data)
            return
        self.fs.create_dir(self.root, recursive=True)
        temporary = self._path(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        self.fs.move(temporary, self._path(name))  # an object store's put is whole: no torn object

    def _children(self, *names: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._path(*names), recursive=False, allow_not_found=True)
        return sorted(self.fs.get_file_info(selector), key=lambda info: info.path)

    def _copy_tree(self, source: str, target: str) -> None:
        self.fs.create_dir(target, recursive=True)
        for info in self.fs.get_file_info(pafs.FileSelector(source, recursive=True)):
            destination = target + info.path[len(source):]
            if info.type == pafs.FileType.Directory:
                self.fs.create_dir(destination, recursive=True)
            else:
                self.fs.copy_file(info.path, destination)

    # -- the search space --------------------------------------------------------

    def save_space(self, space: dict[str, Any]) -> None:
        self.write(SPACE_FILE, json.dumps(space, indent=1, sort_keys=True).encode())

    def saved_space(self) -> dict[str, Any] | None:
        """The space the sweep was started with; None for a sweep started before it was recorded."""
        data = self.read(SPACE_FILE)
        return json.loads(data) if data is not None else None

    # -- Tune's own state --------------------------------------------------------

    def backup_tuner_state(self) -> None:
        """Keep an atomically written copy of Tune's ``tuner.pkl``.

        Tune rewrites the files of an experiment in place (when it syncs its driver
        staging folder to the storage path, for one), so a driver killed at the
        wrong moment can leave ``tuner.pkl`` empty, and the sweep could never be
        resumed. Seen in tests/test_driver_kill.py.
        """
        state = self.read(_TUNER_STATE)
        if state:
            self.write(_TUNER_BACKUP, state)

    def repair(self) -> None:
        """Undo what a kill mid-write can leave before Tune reads the experiment back.

        * an empty or torn ``tuner.pkl``: put the backup back;
        * a torn newest ``experiment_state-<time>.json``: move it and the searcher
          files of the same snapshot aside, so Tune restores the snapshot before it;
        * a trial whose snapshot names checkpoints Tune has since deleted (it keeps
          ``num_to_keep`` and snapshots only after that many new ones, so a kill in
          between leaves the snapshot pointing at deleted folders): the trial's
          newest checkpoint is copied under the names the snapshot expects. The
          trial then resumes from its newest epoch, which is the point.
        """
        backup = self.read(_TUNER_BACKUP)
        if backup and not _parses(self.read(_TUNER_STATE), pickle.loads):
            self.write(_TUNER_STATE, backup)
        snapshots = [i for i in self._children() if re.fullmatch(r"experiment_state-.*\.json", i.base_name)]
        if len(snapshots) > 1 and not _parses(self.read(snapshots[-1].base_name), json.loads):
            stamp = snapshots[-1].base_name.removeprefix("experiment_state-").removesuffix(".json")
            aside = self._path("torn_snapshots")
            self.fs.create_dir(aside, recursive=True)
            for info in self._children():
                if f"-{stamp}." in info.base_name:  # the snapshot and the searcher files saved with it
                    self.fs.move(info.path, f"{aside}/{info.base_name}")
            snapshots = snapshots[:-1]
        if snapshots:
            self._restore_named_checkpoints(snapshots[-1].base_name)

    def _restore_named_checkpoints(self, snapshot: str) -> None:
        try:
            trials = json.loads(self.read(snapshot) or b"")["trial_data"]
        except (ValueError, KeyError):
            return
        folders = [i for i in self._children() if i.type == pafs.FileType.Directory]
        for trial_json, runtime_json in trials:
            trial_id = json.loads(trial_json).get("trial_id", "")
            # The checkpoint manager is stored as a cloudpickle blob in hex; the folder
            # names it refers to can be read off the bytes without unpickling anything.
            blobs = [v["value"] for v in json.loads(runtime_json).values()
                     if isinstance(v, dict) and v.get("_type") == "CLOUDPICKLE_FALLBACK"]
            named = {m.decode() for blob in blobs for m in re.findall(rb"checkpoint_\d{6}", bytes.fromhex(blob))}
            for trial_dir in (f for f in folders if f"_{trial_id}_" in f.base_name):
                existing = [c.path for c in self._children(trial_dir.base_name) if c.base_name.startswith("checkpoint_")]
                for name in sorted(named):
                    target = f"{trial_dir.path}/{name}"
                    if existing and self.fs.get_file_info(target).type == pafs.FileType.NotFound:
                        self._copy_tree(existing[-1], target)


def _parses(data: bytes | None, parse: Callable[[bytes], Any]) -> bool:
    """Whether ``data`` exists and parses (a pickle Tune itself wrote, or JSON)."""
    if not data:
        return False
    try:
        parse(data)
        return True
    except Exception:  # noqa: BLE001 - empty, torn or missing: all mean "not usable"
        return False

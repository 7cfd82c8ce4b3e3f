"""The files r2sweep keeps in a Tune experiment folder: local or at a storage URI.

A sweep's Tune state lives in ``<storage>/<name>``: a local folder, or a URI
(``s3://``, ``gs://``, ``file://``, anything pyarrow has a file system for,
which is what Ray itself uses). Everything r2sweep does there goes through one
pyarrow file system (:class:`ExperimentFolder`), so a sweep on shared storage
gets the same guarantees as a local one. r2sweep's own file there is the sweep's
record (:data:`~r2sweep.core.config.record.RECORD_FILE`, the same text its MLflow
parent run keeps): a resume with another search space is refused, naming the
first field that differs.

The repairs of Tune's own files after a driver kill, which use the operations
here, are in :mod:`r2sweep.tune.state_repairs`.
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs

from r2sweep.core.checkpoint import save_bytes_atomic
from r2sweep.core.config.record import RECORD_FILE
from r2sweep.core.locations import is_uri

__all__ = ["ExperimentFolder"]


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

    def path(self, *names: str) -> str:
        """The file system path of ``names`` below the folder (the folder itself without any)."""
        return "/".join([self.root, *names])

    # -- small file operations -------------------------------------------------

    def read(self, *names: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(*names)) as stream:
                return stream.read()
        except (FileNotFoundError, OSError):
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` so that a reader sees the old file or the new one, never a torn one."""
        if self.local:
            save_bytes_atomic(self.path(name), data)
            return
        self.fs.create_dir(self.root, recursive=True)
        temporary = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        self.fs.move(temporary, self.path(name))  # an object store's put is whole: no torn object

    def children(self, *names: str) -> list[pafs.FileInfo]:
        """What is directly in the folder (or in ``names`` below it), sorted by path; [] when absent."""
        selector = pafs.FileSelector(self.path(*names), recursive=False, allow_not_found=True)
        return sorted(self.fs.get_file_info(selector), key=lambda info: info.path)

    def copy_tree(self, source: str, target: str) -> None:
        """Copy the folder ``source`` to ``target`` (file system paths, as :meth:`path` gives)."""
        self.fs.create_dir(target, recursive=True)
        for info in self.fs.get_file_info(pafs.FileSelector(source, recursive=True)):
            destination = target + info.path[len(source):]
            if info.type == pafs.FileType.Directory:
                self.fs.create_dir(destination, recursive=True)
            else:
                self.fs.copy_file(info.path, destination)

    # -- the sweep's record ------------------------------------------------------

    def save_record(self, text: str) -> None:
        self.write(RECORD_FILE, text.encode())

    def saved_record(self) -> str | None:
        """The record the sweep was started with; None when the folder has none."""
        data = self.read(RECORD_FILE)
        return data.decode() if data is not None else None

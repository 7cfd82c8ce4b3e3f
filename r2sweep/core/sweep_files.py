"""Where each file of a sweep lives, for a local storage or a URI: decided here, once.

A sweep named NAME in storage S keeps Tune's state in ``S/NAME`` (its experiment
folder: a local folder made absolute, or a URI such as ``s3://bucket/prefix/NAME``)
with its record beside it (``sweep.yaml``, :mod:`r2sweep.core.config.record`).
Beside them, when the storage is local: the tracking journal (``tracking/``),
the exported best configuration (``best.yaml``), the Optuna study (``optuna.db``),
and, one level up and shared by every sweep of that storage, the pre-training
cache (``pretrain_cache/``). Under a URI storage the journal and ``best.yaml`` stay
in the working folder (``r2sweep_journal/NAME``, ``NAME-best.yaml``: they are
written file by file as the sweep runs), the cache is ``<storage>/pretrain_cache``
on S3 (the object store it has a backend for) and off elsewhere, and the study is
off; ``sweep.optuna_storage`` / ``sweep.pretrain_cache`` may name a place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from r2sweep.core.config.sweep import CACHE_URI_SCHEMES, OPTUNA_FILE, PRETRAIN_CACHE_FOLDER, SweepSettings
from r2sweep.core.locations import is_uri, join, scheme_of

__all__ = ["DEFAULT_STORAGE", "SweepFiles", "experiment_path"]

#: Where sweeps keep their files when no storage is given (relative to the working folder).
DEFAULT_STORAGE = "r2sweep_results"


def experiment_path(storage: str | os.PathLike[str], name: str) -> str:
    """Where Tune keeps sweep ``name``: ``<storage>/<name>`` (a local path made absolute, or a URI)."""
    return join(storage, name)


@dataclass(frozen=True)
class SweepFiles:
    """The places of sweep ``name`` kept in ``storage`` with ``settings``."""

    storage: str
    name: str
    settings: SweepSettings

    @classmethod
    def of_experiment(cls, experiment: str, settings: SweepSettings) -> SweepFiles:
        """The places of the sweep whose experiment folder is ``experiment`` (as its MLflow run records it)."""
        storage, _, name = experiment.rstrip("/").rpartition("/")
        return cls(storage, name, settings)

    @property
    def local(self) -> bool:
        return not is_uri(self.storage)

    @property
    def experiment(self) -> str:
        return experiment_path(self.storage, self.name)

    @property
    def journal_dir(self) -> str:
        """The tracking journal's folder (a local one: it is appended to and fsynced line by line)."""
        return str(Path(self.experiment) / "tracking") if self.local else str(Path("r2sweep_journal") / self.name)

    @property
    def best_config(self) -> Path:
        """Where the sweep exports its best trial's config."""
        return Path(self.experiment) / "best.yaml" if self.local else Path(f"{self.name}-best.yaml")

    @property
    def optuna_url(self) -> str | None:
        """The Optuna study's storage URL; None: none (the default under a URI storage)."""
        chosen = self.settings.optuna_storage
        if chosen is False:
            return None
        if isinstance(chosen, str):
            return chosen
        return f"sqlite:///{os.path.join(self.experiment, OPTUNA_FILE)}" if self.local else None

    @property
    def pretrain_cache(self) -> str | None:
        """The pre-training cache's folder or ``s3://`` URI; None: off (the default under a non-S3 URI storage)."""
        chosen = self.settings.pretrain_cache
        if chosen is False:
            return None
        if isinstance(chosen, str):
            return chosen if is_uri(chosen) else os.path.abspath(os.path.expanduser(chosen))
        if self.local:
            return os.path.join(os.path.abspath(os.path.expanduser(self.storage)), PRETRAIN_CACHE_FOLDER)
        return join(self.storage, PRETRAIN_CACHE_FOLDER) if scheme_of(self.storage) in CACHE_URI_SCHEMES else None

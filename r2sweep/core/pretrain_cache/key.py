"""What a pre-training depends on, as one digest: the pre-training cache's key.

Two trials whose keys are equal pre-train to the same weights (bit-identical on
the CPU), so the second one may take the first one's. The key therefore holds
everything the pre-training reads and nothing it does not:

* in: the data section (defaults filled in), the model section (its options, and
  ``init_from``'s content hash rather than its path), the code that builds them
  (a user module's source hash, a plugin's distribution and version), the train
  section, the R2 section, the seed, the device kind, torch's version and
  :data:`PRETRAIN_SEMANTICS`;
* out: the downstream methods, the grid the per-epoch ``proxy/top1`` rounds to
  (a property of the trial, not of its pre-training: the entry records the
  grid its history was measured on, and a trial with another one measures its
  own; :mod:`r2sweep.core.pretraining`), the objective, the
  search and every ``sweep:`` setting, fields the chosen optimizer, schedule or
  R2 kind never reads (``train.step_gamma`` under cosine), and the loader's
  ``train.num_workers`` (batches and augmentation depend on ``(seed, epoch)`` only).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r2sweep import __version__
from r2sweep.core.config.sections import to_dict
from r2sweep.core.config.trial import TrialConfig
from r2sweep.core.data import DATASETS
from r2sweep.core.environment import resolve_inputs
from r2sweep.core.factories import is_installed, module_source, resolve_reference
from r2sweep.core.models import MODELS

__all__ = ["CacheKey", "NotCacheable", "pretrain_key", "PRETRAIN_SEMANTICS"]

#: The version of what pre-training computes. Bump it with any change to the
#: training loop, the built-in models or datasets, or the R2 losses that changes
#: the weights a config trains to: every entry made before then stops matching.
PRETRAIN_SEMANTICS = 2  # 2: a shuffled loader drops a final batch of one sample

# Train fields that change how fast pre-training runs, never what it computes.
_SPEED_ONLY = ("num_workers",)
# The data-parallel rank count is part of the key: at the same global batch and seed, 2 ranks do not
# give 1 rank's weights (each rank's BatchNorm statistics, another summation order; benchmarks/
# data_parallel.py measures by how much). One rank leaves it out, so keys from before it existed hold.
_ONE_WORKER = {True: ("workers",), False: ()}
# A package folder larger than this is identified by its defining file alone.
_MAX_HASHED_FILES = 2000


class NotCacheable(Exception):
    """This trial's pre-training has no stable identity (a factory without readable source)."""


@dataclass(frozen=True)
class CacheKey:
    """The digest (an entry's name) and the material it was computed from (kept in the entry's manifest)."""

    digest: str
    material: dict[str, Any]

    @property
    def short(self) -> str:
        return self.digest[:12]


def _hash_files(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(root) if root in file.parents else file.name).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _distribution(module: str) -> str | None:
    names = importlib.metadata.packages_distributions().get(module.split(".")[0], [])
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _code_identity(section: str, factory: str | None, name: str | None) -> str:
    """Which code builds a section: r2sweep's own, a plugin's release, or a hash of the user's source."""
    if factory is None:
        registry = MODELS if section == "model" else DATASETS
        origin = registry.origin(name or "")
        return origin or f"r2sweep {__version__}"  # a plugin's distribution and version, or the package's own
    module = factory.split(":", 1)[0]
    if module.split(".")[0] == "r2sweep":
        return f"r2sweep {__version__}"
    source = module_source(factory)
    if source is None:  # a callable given from Python that does not import by name
        try:
            text = inspect.getsource(resolve_reference(f"{section}.factory", factory))
        except (OSError, TypeError) as error:
            raise NotCacheable(f"{section}.factory {factory} has no readable source ({error})") from None
        return "source " + hashlib.sha256(text.encode()).hexdigest()
    if is_installed(source):
        release = _distribution(module)
        if release is not None:
            return release
    files = [source] if source.is_file() else [p for p in source.rglob("*.py") if "__pycache__" not in p.parts]
    if len(files) > _MAX_HASHED_FILES:
        files = [Path(inspect.getsourcefile(resolve_reference(f"{section}.factory", factory)) or source)]
    root = source.parent if source.is_file() else source
    return "source " + _hash_files([f for f in files if f.is_file()], root)


def _without(mapping: dict[str, Any], section: str, unused: dict[str, str], also: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if f"{section}.{k}" not in unused and k not in also}


def pretrain_key(config: TrialConfig, device: torch.device) -> CacheKey:
    """The cache key of ``config``'s pre-training on a ``device`` of this kind.

    Raises:
        NotCacheable: a factory's identity cannot be established; the trial pre-trains without the cache.
    """
    resolve_inputs(config)  # what the trial will run: its factories' defaults filled in, init_from hashed
    unused = config.unused_fields()
    model = config.model.to_mapping()
    model.pop("init_from", None)  # the content hash (kept) identifies the checkpoint, not where it lies
    material = {
        "semantics": PRETRAIN_SEMANTICS,
        "torch": torch.__version__,
        "device": device.type,
        "seed": config.seed,
        "data": config.data.to_mapping(),
        "data_code": _code_identity("data", config.data.factory, config.data.name),
        "model": model,
        "model_code": _code_identity("model", config.model.factory, config.model.name),
        "train": _without(to_dict(config.train), "train", unused, _SPEED_ONLY + ("device",) + _ONE_WORKER[config.train.workers == 1]),
        "r2": _without(to_dict(config.r2), "r2", unused),
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return CacheKey(hashlib.sha256(text.encode()).hexdigest(), json.loads(text))

"""The dataset registry, :func:`build_data` and :func:`create_data`.

Every entry follows the dataset-factory contract (:mod:`r2sweep.core.factories`):
called with keyword arguments, ``seed``, ``root`` and ``val_fraction`` when its
signature names them, plus its own options (read off the signature, so a
``data.<option>`` typo is caught here, once, for every dataset), it returns what
:func:`~r2sweep.core.data.splits.as_splits` accepts. A user's ``data.factory`` and
an installed plugin (entry-point group ``r2sweep.datasets``) follow the same
contract. The package's datasets name all three and return :class:`DataSplits`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from r2sweep.core.data.stratified import stratified_split
from r2sweep.core.data.splits import DataSplits, as_splits
from r2sweep.core.errors import ConfigError
from r2sweep.core.factories import call_factory, check_options, factory_signature
from r2sweep.core.registry import Registry
from r2sweep.core.validate import require_int

__all__ = [
    "DataSplits",
    "DATASETS",
    "PROVIDED",
    "build_data",
    "register_dataset",
    "create_data",
    "list_datasets",
    "dataset_options",
    "require_root",
    "stratified_split",
    "TransformSubset",
]

#: What r2sweep gives a dataset factory (each only when its signature names it); the rest are its options.
PROVIDED = ("seed", "root", "val_fraction")


DataBuilder = Callable[..., DataSplits]

DATASETS: Registry[DataBuilder] = Registry("data.name", entry_points="r2sweep.datasets")


def register_dataset(name: str) -> Callable[[DataBuilder], DataBuilder]:
    """Decorator registering a dataset factory under ``name`` (the value of ``data.name``), by the contract.

    The package's own datasets take keyword-only ``seed: int``, ``root: str | None``
    and ``val_fraction: float | None`` (``None``: the dataset's own default) and
    further options with defaults; those are the only ``data.*`` options
    :func:`create_data` lets through.
    """
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names accepted by :func:`create_data`, sorted."""
    return DATASETS.names()


def dataset_options(name: str) -> dict[str, Any]:
    """The options of dataset ``name`` with their defaults (``data.name`` must be registered)."""
    return factory_signature("data.name", DATASETS.get(name)).options(PROVIDED)


def build_data(
    factory: DataBuilder,
    *,
    field: str,
    reference: str,
    seed: int,
    root: str | None,
    val_fraction: float | None,
    options: Mapping[str, Any],
) -> DataSplits:
    """Call a dataset factory by the contract and turn what it returned into :class:`DataSplits`.

    ``root`` and ``val_fraction`` reach a factory that names them; one set for a
    factory that does not is refused, as an unknown option is.

    Raises:
        ConfigError: naming ``data.<option>``, or ``field`` when the factory raised or
            returned something else (:func:`~r2sweep.core.data.splits.as_splits`).
    """
    signature = factory_signature(field, factory)
    check_options("data", reference, signature, PROVIDED, options)
    for key, value in (("root", root), ("val_fraction", val_fraction)):
        if value is not None and key not in signature.names:
            raise ConfigError(f"data.{key}", value, f"null: {reference} takes no {key} (its options are "
                              f"{sorted(signature.options(PROVIDED))})")
    provided = {"seed": seed, "root": root, "val_fraction": val_fraction}
    return as_splits(field, call_factory(field, reference, factory, signature, provided, options))


def create_data(
    name: str,
    *,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    val_fraction: float | None = None,
    **options: Any,
) -> DataSplits:
    """Load dataset ``name`` and split it into train and validation sets.

    Args:
        name: a registered dataset, see :func:`list_datasets`.
        seed: decides every random choice of the split (and synthetic data).
        root: directory of on-disk datasets (``cifar10``, ``cifar100``,
            ``imagefolder``); ignored by in-memory ones. r2sweep never downloads.
        val_fraction: fraction in (0, 1) held out from the training files for
            validation; ``None`` uses the dataset's default (its official
            validation split where it has one).
        **options: dataset-specific options, see :func:`dataset_options`.

    Raises:
        ConfigError: unknown dataset or option, or an invalid value (the message
            names the ``data.*`` field).
        DataNotFoundError: the dataset's files are not under ``root``.
    """
    builder = DATASETS.get(name)
    seed = require_int("seed", seed, 0)
    if val_fraction is not None and (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, Real)
        or not 0.0 < float(val_fraction) < 1.0
    ):
        raise ConfigError("data.val_fraction", val_fraction, "a number strictly between 0 and 1, or null")
    return build_data(builder, field="data.name", reference=name, seed=seed,
                      root=None if root is None else os.fspath(root),
                      val_fraction=None if val_fraction is None else float(val_fraction), options=options)


def require_root(root: str | None, dataset: str) -> Path:
    """The expanded ``data.root`` of an on-disk dataset; ConfigError when it was not given."""
    if root is None or str(root).strip() == "":
        raise ConfigError(
            "data.root", root,
            f"dataset {dataset!r} reads files from disk: set data.root to the directory holding them",
        )
    return Path(root).expanduser()


class TransformSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to its image.

    Lets a train and a validation split share one loaded dataset while using
    different transforms (augmentation only on train).

    Args:
        base: yields ``(image, label)``.
        indices: which items of ``base`` this split holds, in order.
        transform: applied to the image; ``None`` leaves it as is.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | np.ndarray,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[index]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)

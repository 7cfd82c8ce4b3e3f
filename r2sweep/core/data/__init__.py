"""Datasets and deterministic loaders.

``create_data(name, ...)`` returns :class:`DataSplits` for a registered dataset
(``digits``, ``synthetic``, ``cifar10``, ``cifar100``, ``imagefolder``);
``make_loader`` batches a split with an order fixed by ``(seed, epoch)``.
r2sweep never downloads data.
"""

from __future__ import annotations

from r2sweep.core.data.loader import EpochLoader, epoch_seed, make_loader
from r2sweep.core.data.registry import (
    DATASETS,
    DataSplits,
    TransformSubset,
    create_data,
    dataset_options,
    list_datasets,
    register_dataset,
)

# Imported for their side effect: each module registers its datasets.
from r2sweep.core.data import cifar, digits, distorted_digits, imagefolder, synthetic  # noqa: E402,F401  isort: skip

__all__ = [
    "DATASETS",
    "DataSplits",
    "EpochLoader",
    "TransformSubset",
    "create_data",
    "dataset_options",
    "epoch_seed",
    "list_datasets",
    "make_loader",
    "register_dataset",
]

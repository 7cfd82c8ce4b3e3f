"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

The fast default dataset of tests and smoke runs: a small CNN reaches ~97% in seconds.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from r2sweep.core.data.registry import DataSplits, register_dataset, stratified_split

__all__ = ["digits_arrays", "load_digits_splits"]

_DEFAULT_VAL_FRACTION = 0.2


@register_dataset("digits")
def load_digits_splits(*, seed: int, root: str | None, val_fraction: float | None) -> DataSplits:
    """Stratified split of ``sklearn.datasets.load_digits``, standardised with train statistics.

    ``val_fraction`` defaults to 0.2 (1437 train / 360 val). Inputs are shifted
    and scaled by the train split's scalar mean and std, so no validation
    information leaks into training. ``root`` is ignored (the data ships with sklearn).
    """
    pixels, targets = digits_arrays()
    images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(targets, dtype=torch.int64)
    train_idx, val_idx = stratified_split(
        targets, _DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, seed
    )
    train_x, val_x = images[train_idx], images[val_idx]
    mean, std = train_x.mean(), train_x.std()
    return DataSplits(
        train=TensorDataset((train_x - mean) / std, labels[train_idx]),
        val=TensorDataset((val_x - mean) / std, labels[val_idx]),
        num_classes=10,
        in_channels=1,
        input_size=8,
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images, labels)``: float64 ``(1797, 8, 8)`` pixels from 0
    to 16 and int64 labels, the arrays of ``sklearn.datasets.load_digits()``.

    Read from the file scikit-learn ships, without importing scikit-learn (about two
    seconds of CPU that every trial process paid before its first epoch); through
    ``load_digits`` when that file is not where scikit-learn keeps it. Fresh copies.
    """
    images, labels = _digits_file()
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _digits_file() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    shipped = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if shipped is None or not shipped.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(shipped, "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")  # 64 pixels, then the label, per row
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)

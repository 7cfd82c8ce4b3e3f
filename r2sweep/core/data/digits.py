"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

The fast default dataset of tests and smoke runs: a small CNN reaches ~97% in seconds.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from r2sweep.core.data.registry import DataSplits, register_dataset, stratified_split

__all__ = ["load_digits_splits"]

_DEFAULT_VAL_FRACTION = 0.2


@register_dataset("digits")
def load_digits_splits(*, seed: int, root: str | None, val_fraction: float | None) -> DataSplits:
    """Stratified split of ``sklearn.datasets.load_digits``, standardised with train statistics.

    ``val_fraction`` defaults to 0.2 (1437 train / 360 val). Inputs are shifted
    and scaled by the train split's scalar mean and std, so no validation
    information leaks into training. ``root`` is ignored (the data ships with sklearn).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, val_idx = stratified_split(
        bunch.target, _DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, seed
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

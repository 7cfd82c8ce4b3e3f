"""``synthetic``: noisy copies of one random prototype image per class.

Needs no files and is learnable to near 100% in an epoch or two, so a broken
training loop shows up as an accuracy far below that, in seconds.
"""

from __future__ import annotations

from numbers import Real

import torch
from torch.utils.data import TensorDataset

from r2sweep.core.data.registry import DataSplits, register_dataset, stratified_split
from r2sweep.core.errors import ConfigError
from r2sweep.core.validate import require_int

__all__ = ["make_synthetic"]

_DEFAULT_VAL_FRACTION = 0.2


@register_dataset("synthetic")
def make_synthetic(
    *,
    seed: int,
    root: str | None,
    val_fraction: float | None,
    num_samples: int = 1024,
    num_classes: int = 10,
    input_size: int = 8,
    channels: int = 1,
    noise: float = 0.5,
) -> DataSplits:
    """Prototype-plus-Gaussian-noise classification data, entirely determined by ``seed``.

    Args:
        seed: fixes the prototypes, the noise and the split.
        root: ignored.
        val_fraction: held-out fraction, default 0.2 (stratified).
        num_samples: total samples, split into balanced classes.
        num_classes: number of classes (>= 2).
        input_size: side of the square images (>= 4).
        channels: image channels (>= 1).
        noise: standard deviation of the per-pixel Gaussian noise; prototypes have std 1.
    """
    num_classes = require_int("data.num_classes", num_classes, 2)
    num_samples = require_int("data.num_samples", num_samples, 2 * num_classes)
    input_size = require_int("data.input_size", input_size, 4)
    channels = require_int("data.channels", channels, 1)
    if isinstance(noise, bool) or not isinstance(noise, Real) or not noise >= 0:
        raise ConfigError("data.noise", noise, "a number >= 0")

    gen = torch.Generator().manual_seed(seed)
    shape = (channels, input_size, input_size)
    prototypes = torch.randn((num_classes, *shape), generator=gen)
    # Balanced labels in a seeded order, so neither split is sorted by class.
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]
    images = prototypes[labels] + float(noise) * torch.randn((num_samples, *shape), generator=gen)
    train_idx, val_idx = stratified_split(
        labels.numpy(), _DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, seed
    )
    train_idx_t, val_idx_t = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return DataSplits(
        train=TensorDataset(images[train_idx_t], labels[train_idx_t]),
        val=TensorDataset(images[val_idx_t], labels[val_idx_t]),
        num_classes=num_classes,
        in_channels=channels,
        input_size=input_size,
    )

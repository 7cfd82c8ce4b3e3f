"""``distorted_digits``: deterministic, disjoint sources, standardised, validated options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r2sweep.core.data import create_data
from r2sweep.core.data.distorted_digits import render_digits, source_split
from r2sweep.core.errors import ConfigError

SMALL = {"train_variants": 1, "val_variants": 1}


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.tensors


def test_it_depends_on_data_seed_only_and_not_on_the_trial_seed() -> None:
    a = create_data("distorted_digits", seed=0, **SMALL)
    b = create_data("distorted_digits", seed=7, **SMALL)
    c = create_data("distorted_digits", seed=0, data_seed=1, **SMALL)
    assert torch.equal(_tensors(a.train)[0], _tensors(b.train)[0]) and torch.equal(_tensors(a.val)[0], _tensors(b.val)[0])
    assert not torch.equal(_tensors(a.val)[0], _tensors(c.val)[0])


def test_train_and_validation_come_from_disjoint_source_images() -> None:
    train_idx, val_idx = source_split(None, 0)
    assert len(train_idx) + len(val_idx) == 1797 and len(val_idx) == 360
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    data = create_data("distorted_digits", seed=0, train_variants=2, val_variants=3)
    train_x, train_y = _tensors(data.train)
    val_x, val_y = _tensors(data.val)
    assert train_x.shape == (2 * 1437, 1, 16, 16) and val_x.shape == (3 * 360, 1, 16, 16)
    assert data.input_size == 16 and data.num_classes == 10 and data.in_channels == 1
    # Every class in both splits, balanced as the sources are (stratified).
    assert np.bincount(val_y.numpy(), minlength=10).min() >= 3 * 35
    # Standardised with the training split's statistics.
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-3


def test_renders_are_distorted_and_cluttered_not_copies() -> None:
    gen = torch.Generator().manual_seed(0)
    one = torch.zeros((1, 1, 8, 8))
    one[0, 0, 1:7, 3:5] = 1.0  # a vertical bar
    pool = torch.rand((4, 1, 8, 8))
    images = render_digits(one.repeat(8, 1, 1, 1), pool, 16, gen)
    assert images.shape == (8, 1, 16, 16)
    # The same source renders differently each time.
    flat = images.reshape(8, -1)
    assert min(float((flat[i] - flat[j]).abs().mean()) for i in range(8) for j in range(i)) > 0.05
    # With no warp, clutter or noise the bar is where it was drawn (upscaled, zoomed out).
    clean = render_digits(one, pool[:1], 16, torch.Generator().manual_seed(0), severity=0.0, clutter=0, noise=0.0)
    column_mass = clean[0, 0].clamp_min(0).sum(dim=0)
    assert int(column_mass.argmax()) in (7, 8)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("size", 4, "data.size=4"),
        ("size", 100, "an integer from 8 to 64"),
        ("train_variants", 0, "data.train_variants=0"),
        ("severity", 3.0, "a number from 0 to 2"),
        ("data_seed", -1, "data.data_seed=-1"),
    ],
)
def test_bad_options_name_the_field(option: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        create_data("distorted_digits", seed=0, **{option: value})

"""r2sweep's stratified split and digits loader against scikit-learn's, which they replace
to spare every trial process scikit-learn's import: the same indices and the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from r2sweep.core.data.digits import digits_arrays
from r2sweep.core.data.stratified import stratified_split
from r2sweep.core.errors import ConfigError


def _sklearn(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train, val = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def _label_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "digits": load_digits().target,
        "balanced": np.repeat(np.arange(10), 30),
        # Unequal classes with remainders that tie: the generator breaks the ties.
        "skewed": np.repeat(np.arange(5), [2, 3, 7, 11, 40]),
        "shuffled strings": rng.permutation(np.repeat(np.array(["cat", "dog", "eel"]), [9, 14, 6])),
        "random": rng.integers(0, 7, size=501),
    }


@pytest.mark.parametrize("name", list(_label_sets()))
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.37, 0.5, 0.8])
def test_the_split_is_sklearns_split(name: str, fraction: float) -> None:
    labels = _label_sets()[name]
    for seed in range(12):
        try:
            expected_train, expected_val = _sklearn(labels, fraction, seed)
        except ValueError:  # a split stratification cannot make: refused by both
            with pytest.raises(ConfigError, match=r"data\.val_fraction"):
                stratified_split(labels, fraction, seed)
            continue
        train, val = stratified_split(labels, fraction, seed)
        assert np.array_equal(train, expected_train) and np.array_equal(val, expected_val), (name, fraction, seed)
        assert train.dtype.kind == val.dtype.kind == "i"


def test_the_split_is_a_partition_that_keeps_every_class_on_both_sides() -> None:
    labels = _label_sets()["skewed"]
    train, val = stratified_split(labels, 0.3, 3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert len(val) == int(np.ceil(0.3 * len(labels)))
    assert set(labels[train]) == set(labels[val]) == set(labels)


@pytest.mark.parametrize("labels, fraction, why", [
    (np.array([0, 0, 1, 1, 2]), 0.4, "classes with a single sample: [2]"),
    (np.repeat(np.arange(10), 3), 0.1, "3 validation samples for 10 classes"),
    (np.repeat(np.arange(10), 3), 0.9, "3 train samples for 10 classes"),
    (np.repeat(np.arange(2), 5), 1.0, "it must be between 0 and 1"),
])
def test_a_split_stratification_cannot_make_names_the_field(labels: np.ndarray, fraction: float, why: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.val_fraction") as caught:
        stratified_split(labels, fraction, 0)
    assert why in str(caught.value)


def test_digits_are_sklearns_digits() -> None:
    images, labels = digits_arrays()
    bunch = load_digits()
    assert images.dtype == bunch.images.dtype and images.shape == bunch.images.shape == (1797, 8, 8)
    assert labels.dtype == np.int64 and np.array_equal(labels, bunch.target)
    assert np.array_equal(images, bunch.images)
    images[0, 0, 0] = -1.0  # a copy: the next caller is not affected
    assert digits_arrays()[0][0, 0, 0] == bunch.images[0, 0, 0]


def test_digits_come_from_load_digits_when_the_shipped_file_is_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from r2sweep.core.data import digits

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    digits._digits_file.cache_clear()
    try:
        images, labels = digits_arrays()
    finally:
        digits._digits_file.cache_clear()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)

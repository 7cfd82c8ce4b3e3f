"""The seeded, class-stratified train/validation split every built-in dataset uses.

It draws exactly the split that scikit-learn's ``train_test_split(indices,
test_size=val_fraction, stratify=labels, random_state=seed)`` draws (the split of
every result recorded so far), with numpy alone: importing scikit-learn costs about
two seconds of CPU, which every trial process paid before its first epoch.
``tests/test_data_split.py`` checks the two against each other.

How the split is drawn: the validation side gets ``ceil(fraction * n)`` samples and
the train side the rest. Each side's per-class counts are the class proportions
scaled to the side's size, rounded down, and the samples still missing go to the
classes with the largest rounding remainders (ties broken by the seeded generator).
Then each class's indices are shuffled and cut: the first go to train, the next to
validation. One ``numpy.random.RandomState(seed)`` makes every draw, in that order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from r2sweep.core.errors import ConfigError

__all__ = ["stratified_split"]


def _counts_per_class(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` samples each class gives: proportional, rounded down, and
    the shortfall handed out by largest remainder (a tie drawn at random)."""
    exact = class_counts / class_counts.sum() * draws
    counts = np.floor(exact)
    missing = int(draws - counts.sum())
    remainder = exact - counts
    for value in np.unique(remainder)[::-1]:  # the largest remainder first
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        counts[chosen] += 1
        missing -= len(chosen)
    return counts.astype(int)


def _refuse(val_fraction: float, labels: np.ndarray, why: str) -> ConfigError:
    return ConfigError(
        "data.val_fraction", val_fraction,
        f"a fraction that leaves every class on both sides of a stratified split of {len(labels)} samples ({why})",
    )


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified ``(train_indices, val_indices)``, each sorted.

    Raises:
        ConfigError: (``data.val_fraction``) the split would leave a side with
            fewer samples than classes, or a class has a single sample.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < val_fraction < 1:
        raise _refuse(val_fraction, labels, "it must be between 0 and 1")
    n_val = math.ceil(val_fraction * n)
    n_train = n - n_val
    classes, class_of, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise _refuse(val_fraction, labels, f"classes with a single sample: {classes[class_counts < 2].tolist()}")
    for side, size in (("train", n_train), ("validation", n_val)):
        if size < len(classes):
            raise _refuse(val_fraction, labels, f"{size} {side} samples for {len(classes)} classes")

    # Each class's indices in ascending order (a stable sort by class).
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _counts_per_class(class_counts, n_train, rng)
    val_counts = _counts_per_class(class_counts - train_counts, n_val, rng)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for indices, n_train_i, n_val_i in zip(members, train_counts, val_counts):
        shuffled = indices[rng.permutation(len(indices))]
        train.append(shuffled[:n_train_i])
        val.append(shuffled[n_train_i : n_train_i + n_val_i])
    # Sorted so the split is a set: its order carries no information the loader has to preserve.
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))

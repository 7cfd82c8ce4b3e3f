"""What a dataset factory may return, turned into the :class:`DataSplits` every trial uses.

A factory (``data.factory``, an entry point in ``r2sweep.datasets``, or a callable
from Python) may return

* a :class:`DataSplits`;
* a pair ``(train, val)``; or
* a mapping ``{"train": ..., "val": ...}``, optionally with ``num_classes``,
  ``in_channels`` and ``input_size``;

where each split is any ``Dataset`` yielding ``(x, y)`` or a pair of arrays
``(inputs, labels)`` (tensors or NumPy). What is not given is read off the data:
channels and size from the first sample (``(C, H, W)`` images, or ``(C, T)``
sequences for 1-D models), the classes from the labels (arrays), or from a
``Dataset``'s ``targets`` or ``classes`` (the torchvision convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from r2sweep.core.errors import ConfigError

__all__ = ["DataSplits", "as_splits"]


@dataclass(frozen=True)
class DataSplits:
    """A dataset's train and validation splits plus what a model needs to know about them.

    Attributes:
        train: yields ``(x, y)`` with ``x`` a float32 ``(C, H, W)`` tensor and ``y`` an int.
        val: same, without random augmentation.
        num_classes: number of labels (labels are ``0 .. num_classes - 1``).
        in_channels: ``C``.
        input_size: the square side ``H == W`` in pixels.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    input_size: int


_SHAPE = "(train, val) or {'train': ..., 'val': ...} of Datasets or (inputs, labels) arrays, or a DataSplits"


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _as_dataset(field: str, name: str, split: Any) -> tuple[Dataset, torch.Tensor | None]:
    """The split as a Dataset, and its labels when they are at hand (arrays)."""
    if isinstance(split, Dataset):
        return split, None
    if isinstance(split, Sequence) and len(split) == 2 and all(_is_array(part) for part in split):
        inputs = torch.as_tensor(np.asarray(split[0]) if isinstance(split[0], np.ndarray) else split[0])
        labels = torch.as_tensor(np.asarray(split[1]) if isinstance(split[1], np.ndarray) else split[1])
        if inputs.shape[0] != labels.shape[0]:
            raise ConfigError(field, f"{name}: {tuple(inputs.shape)} inputs, {tuple(labels.shape)} labels",
                              "as many labels as inputs")
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ConfigError(field, f"{name} labels {labels.dtype} {tuple(labels.shape)}",
                              "one integer class label per input")
        return TensorDataset(inputs.float(), labels.long()), labels.long()
    raise ConfigError(field, f"{name}: {type(split).__name__}", "a Dataset or a pair of arrays (inputs, labels)")


def _labels_of(dataset: Dataset) -> torch.Tensor | None:
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(np.asarray(targets))
    return None


def _first_sample(field: str, name: str, dataset: Dataset) -> torch.Tensor:
    try:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ConfigError(field, f"{name}: 0 samples", "at least one sample in each split")
        sample = dataset[0]
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's Dataset may raise anything
        raise ConfigError(field, name, f"a split whose samples can be read: {name}[0] raised "
                          f"{type(error).__name__}: {error}") from None
    if not isinstance(sample, (tuple, list)) or len(sample) < 2 or not isinstance(sample[0], torch.Tensor):
        raise ConfigError(field, f"{name}[0]: {type(sample).__name__}", "samples (x, y) with x a tensor (C, H, W) and y an int")
    x = sample[0]
    if x.dim() < 2 or not x.dtype.is_floating_point:
        raise ConfigError(field, f"{name}[0] x: {x.dtype} {tuple(x.shape)}", "a float tensor (C, H, W) or (C, T)")
    return x


def as_splits(field: str, result: Any) -> DataSplits:
    """The :class:`DataSplits` of what a dataset factory returned (see the module docstring).

    Raises:
        ConfigError: naming ``field`` (``data.factory``, or ``data.name`` for a plugin) and what was wrong.
    """
    if isinstance(result, DataSplits):
        return result
    given: dict[str, Any] = {}
    if isinstance(result, Mapping):
        if "train" not in result or "val" not in result:
            raise ConfigError(field, f"a mapping with keys {sorted(map(str, result))}", _SHAPE)
        given = {k: result[k] for k in ("num_classes", "in_channels", "input_size") if k in result}
        train, val = result["train"], result["val"]
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        train, val = result
    else:
        raise ConfigError(field, f"a {type(result).__name__}", _SHAPE)
    train, train_labels = _as_dataset(field, "train", train)
    val, val_labels = _as_dataset(field, "val", val)
    x = _first_sample(field, "train", train)
    _first_sample(field, "val", val)
    in_channels = given.get("in_channels", int(x.shape[0]))
    input_size = given.get("input_size", int(x.shape[1]))
    num_classes = given.get("num_classes")
    if num_classes is None:
        num_classes = _count_classes(field, train, val, train_labels, val_labels)
    return DataSplits(train=train, val=val, num_classes=int(num_classes), in_channels=int(in_channels),
                      input_size=int(input_size))


def _count_classes(field: str, train: Dataset, val: Dataset, train_labels: torch.Tensor | None,
                   val_labels: torch.Tensor | None) -> int:
    labels = [t if t is not None else _labels_of(d) for t, d in ((train_labels, train), (val_labels, val))]
    if all(label is not None for label in labels):
        return int(max(int(label.max()) for label in labels if label.numel())) + 1
    classes = getattr(train, "classes", None)
    if classes is not None:
        return len(classes)
    raise ConfigError(field, type(train).__name__, "splits whose classes can be counted: return a mapping with "
                      "'num_classes' (or a DataSplits), or Datasets with a 'targets' or 'classes' attribute")

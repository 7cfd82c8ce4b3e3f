"""``cifar10`` / ``cifar100`` read from torchvision's on-disk "python version" files.

r2sweep never downloads: the official archives must already be extracted
under ``data.root``. The files are read here rather than through
``torchvision.datasets.CIFAR10`` because torchvision insists on the official
md5 sums, which rules out small fixture files in the same format.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from r2sweep.core.data.registry import (
    DataSplits,
    TransformSubset,
    register_dataset,
    require_root,
    stratified_split,
)
from r2sweep.core.errors import ConfigError, DataNotFoundError

if TYPE_CHECKING:
    from torchvision import transforms

__all__ = ["CIFAR_SPECS", "CifarArrays", "read_cifar", "load_cifar10", "load_cifar100"]

#: Per dataset: folder inside root, train files, test files, label key, classes, mean, std, archive.
CIFAR_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "archive": "cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "archive": "cifar-100-python.tar.gz",
    },
}

_SIZE = 32


class CifarArrays(Dataset):
    """Decoded CIFAR images held in memory: yields ``(uint8 (3, 32, 32) tensor, label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _locate(root: Path, name: str) -> Path:
    """The directory holding the batch files; raises DataNotFoundError listing what is missing."""
    spec = CIFAR_SPECS[name]
    files = spec["train"] + spec["test"]
    candidates = [root / spec["folder"], root]  # also accept root pointing at the extracted folder
    for folder in candidates:
        if all((folder / f).is_file() for f in files):
            return folder
    folder = candidates[0]
    expected = ", ".join(str(folder / f) for f in files)
    missing = ", ".join(str(folder / f) for f in files if not (folder / f).is_file())
    raise DataNotFoundError(
        f"data.root={str(root)!r}: {name} files not found; expected {expected} "
        f"(missing: {missing}). r2sweep never downloads: download the official "
        f"{spec['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
        f"into {str(root)!r} (it creates {spec['folder']}/)."
    )


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files and nothing else.

    The official format is a pickle, and a plain ``pickle.load`` of a file from a
    shared data root would run whatever code the file names. A batch holds only
    dicts, lists, strings, bytes, numbers and NumPy arrays, so only the classes
    that rebuild an array are allowed.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")


def _read_file(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        # The official files were pickled by Python 2: keys come back as bytes.
        try:
            entry = _BatchUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as error:
            raise ConfigError("data.root", str(path), f"a CIFAR batch file ({error})") from error
    if not isinstance(entry, dict):
        raise ConfigError("data.root", str(path), "a CIFAR batch file (a pickled dict)")
    # Accept str keys too, for files re-pickled by Python 3 tools.
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(label_key.encode(), entry.get(label_key))
    if data is None or labels is None:
        raise ConfigError(
            "data.root", str(path), f"a CIFAR batch file with 'data' and {label_key!r} entries"
        )
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * _SIZE * _SIZE or len(labels) != len(data):
        raise ConfigError(
            "data.root", str(path),
            f"'data' of shape (N, {3 * _SIZE * _SIZE}) and N labels, got {data.shape} and {len(labels)}",
        )
    return data, labels


def read_cifar(root: str | Path, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a whole split (``"train"`` or ``"test"``) of ``cifar10``/``cifar100``.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)`` tensors.
    """
    spec = CIFAR_SPECS[name]
    folder = _locate(Path(root), name)
    parts = [_read_file(folder / f, spec["label_key"]) for f in spec[split]]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, _SIZE, _SIZE)
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
        raise ConfigError(
            "data.root", str(folder),
            f"{name} labels in [0, {spec['num_classes'] - 1}], found [{labels.min()}, {labels.max()}]",
        )
    return torch.from_numpy(data), torch.from_numpy(labels)


def _transforms(name: str, augment: bool) -> tuple[transforms.Compose, transforms.Compose]:
    # Imported here: torchvision's import pulls in torch._dynamo (seconds), and most
    # processes (a CLI call, a worker training on digits) never build a transform.
    from torchvision import transforms

    spec = CIFAR_SPECS[name]
    to_float = transforms.ConvertImageDtype(torch.float32)
    normalize = transforms.Normalize(spec["mean"], spec["std"])
    augmentation: list[Any] = (
        # Zero padding before normalisation, i.e. black borders, as in the PIL pipeline.
        [transforms.RandomCrop(_SIZE, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    )
    return (
        transforms.Compose([to_float, *augmentation, normalize]),
        transforms.Compose([to_float, normalize]),
    )


def _load(name: str, seed: int, root: str | None, val_fraction: float | None, augment: bool) -> DataSplits:
    if not isinstance(augment, bool):
        raise ConfigError("data.augment", augment, "true or false")
    path = require_root(root, name)
    train_tf, val_tf = _transforms(name, augment)
    images, labels = read_cifar(path, name, "train")
    train_set = CifarArrays(images, labels)
    if val_fraction is None:
        # The official test split is the validation set: that is what papers report.
        test_images, test_labels = read_cifar(path, name, "test")
        train = TransformSubset(train_set, range(len(train_set)), train_tf)
        val = TransformSubset(CifarArrays(test_images, test_labels), range(len(test_labels)), val_tf)
    else:
        train_idx, val_idx = stratified_split(labels.numpy(), val_fraction, seed)
        train = TransformSubset(train_set, train_idx, train_tf)
        val = TransformSubset(train_set, val_idx, val_tf)
    return DataSplits(
        train=train, val=val, num_classes=CIFAR_SPECS[name]["num_classes"], in_channels=3, input_size=_SIZE
    )


@register_dataset("cifar10")
def load_cifar10(
    *, seed: int, root: str | None, val_fraction: float | None, augment: bool = True
) -> DataSplits:
    """CIFAR-10 from ``root/cifar-10-batches-py``.

    Validation is the official test batch unless ``val_fraction`` is set, in
    which case it is a seeded stratified split of the 50k training images.
    Train images get random crop 32 (padding 4) + horizontal flip when ``augment``.
    """
    return _load("cifar10", seed, root, val_fraction, augment)


@register_dataset("cifar100")
def load_cifar100(
    *, seed: int, root: str | None, val_fraction: float | None, augment: bool = True
) -> DataSplits:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``; otherwise as :func:`load_cifar10`."""
    return _load("cifar100", seed, root, val_fraction, augment)

"""``imagefolder``: ImageNet-style ``root/train/<class>/*`` and ``root/val/<class>/*`` trees."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from r2sweep.core.data.registry import (
    DataSplits,
    TransformSubset,
    register_dataset,
    require_root,
    stratified_split,
)
from r2sweep.core.errors import ConfigError, DataNotFoundError
from r2sweep.core.validate import require_int

if TYPE_CHECKING:
    from torchvision import datasets

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_imagefolder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Standard ImageNet evaluation: resize to size / 0.875 (256 for 224), then centre-crop.
_CROP_FRACTION = 0.875


def _scan(folder: Path, root: Path) -> datasets.ImageFolder:
    if not folder.is_dir():
        raise DataNotFoundError(
            f"data.root={str(root)!r}: directory {str(folder)!r} not found; imagefolder expects "
            f"root/train/<class>/<image> and root/val/<class>/<image>. r2sweep never downloads: "
            f"extract the dataset there first."
        )
    try:
        from torchvision.datasets import ImageFolder  # here, not at the top: see cifar._transforms

        # No transform: images stay PIL so each split can apply its own.
        return ImageFolder(str(folder))
    except FileNotFoundError as exc:
        raise DataNotFoundError(
            f"data.root={str(root)!r}: no usable images under {str(folder)!r} ({exc})"
        ) from None


@register_dataset("imagefolder")
def load_imagefolder(
    *,
    seed: int,
    root: str | None,
    val_fraction: float | None,
    input_size: int = 224,
    augment: bool = True,
) -> DataSplits:
    """Image classification from class sub-directories, via ``torchvision.datasets.ImageFolder``.

    Args:
        seed: seeds the split when ``val_fraction`` is set.
        root: holds ``train/`` and (unless ``val_fraction`` is set) ``val/``.
        val_fraction: ``None`` validates on ``root/val``; a fraction instead
            holds out a seeded stratified part of ``root/train`` (``val/`` then unused).
        input_size: side of the square crops fed to the model.
        augment: train with RandomResizedCrop + horizontal flip; otherwise the
            validation resize + centre crop.

    Raises:
        DataNotFoundError: ``train/`` or ``val/`` missing or without images.
        ConfigError: (``data.root``) train and val class lists differ.
    """
    input_size = require_int("data.input_size", input_size, 4)
    if not isinstance(augment, bool):
        raise ConfigError("data.augment", augment, "true or false")
    path = require_root(root, "imagefolder")
    from torchvision import transforms  # here, not at the top: see cifar._transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    val_tf = transforms.Compose(
        [transforms.Resize(int(input_size / _CROP_FRACTION)), transforms.CenterCrop(input_size), *normalize]
    )
    train_tf = (
        transforms.Compose(
            [transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip(), *normalize]
        )
        if augment
        else val_tf
    )
    train_set = _scan(path / "train", path)
    if val_fraction is None:
        val_set = _scan(path / "val", path)
        if val_set.classes != train_set.classes:
            only_train = sorted(set(train_set.classes) - set(val_set.classes))
            only_val = sorted(set(val_set.classes) - set(train_set.classes))
            raise ConfigError(
                "data.root", str(path),
                f"the same class folders under train/ and val/; only in train: {only_train[:5]}, "
                f"only in val: {only_val[:5]}",
            )
        train = TransformSubset(train_set, range(len(train_set)), train_tf)
        val = TransformSubset(val_set, range(len(val_set)), val_tf)
    else:
        train_idx, val_idx = stratified_split(train_set.targets, val_fraction, seed)
        train = TransformSubset(train_set, train_idx, train_tf)
        val = TransformSubset(train_set, val_idx, val_tf)
    return DataSplits(
        train=train, val=val, num_classes=len(train_set.classes), in_channels=3, input_size=input_size
    )

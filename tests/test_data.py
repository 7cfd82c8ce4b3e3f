"""Datasets and loaders: splits, determinism, and on-disk formats from tiny fixture files."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar
from PIL import Image

from r2sweep.core.data import DataSplits, create_data, dataset_options, list_datasets, make_loader
from r2sweep.core.errors import ConfigError, DataNotFoundError


def _batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_shapes() -> None:
    data = create_data("digits")
    assert isinstance(data, DataSplits)
    assert (len(data.train), len(data.val)) == (1437, 360)
    assert (data.num_classes, data.in_channels, data.input_size) == (10, 1, 8)
    x, y = data.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_digits_is_stratified_and_standardized() -> None:
    data = create_data("digits", seed=3)
    train_x, train_y = data.train.tensors
    val_y = data.val.tensors[1]
    total = Counter(train_y.tolist()) + Counter(val_y.tolist())
    val_counts = Counter(val_y.tolist())
    for label, n in total.items():
        assert abs(val_counts[label] - 0.2 * n) <= 1
    assert abs(train_x.mean().item()) < 1e-5
    assert abs(train_x.std().item() - 1.0) < 1e-5
    # Validation is scaled with the train statistics, not its own: close but not exact.
    assert abs(data.val.tensors[0].mean().item()) < 0.2


def test_digits_split_depends_on_seed() -> None:
    a, b, c = create_data("digits", seed=0), create_data("digits", seed=0), create_data("digits", seed=1)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0]) and torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_digits_val_fraction() -> None:
    data = create_data("digits", val_fraction=0.5)
    assert abs(len(data.val) - 1797 / 2) <= 1 and len(data.train) + len(data.val) == 1797


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_labels_and_determinism() -> None:
    data = create_data("synthetic", seed=5, num_samples=200, num_classes=4, input_size=6, channels=3)
    assert (len(data.train), len(data.val)) == (160, 40)
    assert (data.num_classes, data.in_channels, data.input_size) == (4, 3, 6)
    x, y = data.train.tensors
    assert x.shape == (160, 3, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1, 2, 3}
    again = create_data("synthetic", seed=5, num_samples=200, num_classes=4, input_size=6, channels=3)
    assert torch.equal(x, again.train.tensors[0])
    other = create_data("synthetic", seed=6, num_samples=200, num_classes=4, input_size=6, channels=3)
    assert not torch.equal(x, other.train.tensors[0])


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    # Classes are prototypes plus noise, so class means from train classify val almost perfectly.
    data = create_data("synthetic", seed=0)
    x, y = data.train.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(data.num_classes)]).flatten(1)
    vx, vy = data.val.tensors
    pred = torch.cdist(vx.flatten(1), means).argmin(1)
    assert (pred == vy).float().mean() > 0.95


def test_synthetic_bad_option_value() -> None:
    with pytest.raises(ConfigError, match=r"data\.num_classes"):
        create_data("synthetic", num_classes=1)


# --------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return create_data("digits")


def test_loader_order_depends_only_on_seed_and_epoch(digits: DataSplits) -> None:
    uninterrupted = make_loader(digits.train, 64, shuffle=True, seed=7)
    epochs = [_batches(uninterrupted, e) for e in range(3)]
    # A "resumed" run: fresh loader, jumps straight to epoch 2, with the global RNG disturbed.
    torch.manual_seed(1234)
    torch.rand(100)
    resumed = make_loader(digits.train, 64, shuffle=True, seed=7)
    assert _same(_batches(resumed, 2), epochs[2])
    assert _same(_batches(resumed, 2), epochs[2])  # iterating again repeats the epoch
    assert not _same(epochs[0], epochs[1])
    other_seed = make_loader(digits.train, 64, shuffle=True, seed=8)
    assert not _same(_batches(other_seed, 0), epochs[0])


def test_loader_covers_every_sample_once(digits: DataSplits) -> None:
    loader = make_loader(digits.train, 64, shuffle=True, seed=0)
    batches = _batches(loader, 4)
    assert len(batches) == len(loader) == 23
    assert [len(y) for _, y in batches[:-1]] == [64] * 22 and len(batches[-1][1]) == 1437 - 22 * 64
    seen = torch.cat([x for x, _ in batches]).flatten(1)
    full = digits.train.tensors[0].flatten(1)
    # Same multiset of rows: sort both lexicographically via a unique projection.
    key = torch.arange(1, 65, dtype=torch.float64)
    assert torch.equal(torch.sort(seen.double() @ key).values, torch.sort(full.double() @ key).values)
    assert torch.equal(torch.cat([y for _, y in batches]).bincount(), digits.train.tensors[1].bincount())


def test_loader_drop_last_and_no_shuffle(digits: DataSplits) -> None:
    loader = make_loader(digits.val, 64, shuffle=False, seed=0, drop_last=True)
    batches = _batches(loader, 3)
    assert len(batches) == len(loader) == 5
    assert torch.equal(batches[0][1], digits.val.tensors[1][:64])


def test_loader_rejects_bad_batch_size(digits: DataSplits) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(digits.train, 0, shuffle=True, seed=0)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reads_pickled_batches(tmp_path: Path, name: str, classes: int) -> None:
    write_cifar(tmp_path, name)
    data = create_data(name, root=str(tmp_path))
    assert (len(data.train), len(data.val)) == (20, 10)
    assert (data.num_classes, data.in_channels, data.input_size) == (classes, 3, 32)
    x, y = data.val[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 3
    assert [data.train[i][1] for i in range(20)] == [i % classes for i in range(20)]
    loader = make_loader(data.train, 8, shuffle=True, seed=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_cifar_val_values_are_normalized_pixels(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    data = create_data("cifar10", root=tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0].reshape(3, 32, 32) / 255.0
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(data.val[0][0], (torch.as_tensor(raw, dtype=torch.float32) - mean) / std, atol=1e-5)


def test_cifar_augmentation_is_reproducible_per_epoch(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    data = create_data("cifar10", root=tmp_path)
    first = _batches(make_loader(data.train, 8, shuffle=True, seed=3), 1)
    torch.manual_seed(99)  # the caller's RNG must not matter
    resumed = make_loader(data.train, 8, shuffle=True, seed=3)
    assert _same(_batches(resumed, 1), first)
    assert not _same(_batches(resumed, 2), first)
    state = torch.get_rng_state()
    _batches(resumed, 0)
    assert torch.equal(torch.get_rng_state(), state)  # loading leaves the caller's RNG alone


def test_cifar_loader_with_workers_is_reproducible(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    data = create_data("cifar10", root=tmp_path)
    loader = make_loader(data.train, 5, shuffle=True, seed=1, num_workers=2)
    assert _same(_batches(loader, 1), _batches(loader, 1))
    # Same order as without workers (augmentation streams differ, labels do not).
    serial = make_loader(data.train, 5, shuffle=True, seed=1)
    assert [y.tolist() for _, y in _batches(loader, 1)] == [y.tolist() for _, y in _batches(serial, 1)]


def test_cifar_val_fraction_splits_train(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    data = create_data("cifar10", root=tmp_path, val_fraction=0.5, seed=2)
    assert (len(data.train), len(data.val)) == (10, 10)
    assert sorted(data.val[i][1] for i in range(10)) == list(range(10))  # stratified: one per class


def test_cifar_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        create_data("cifar10", root=str(tmp_path))
    message = str(info.value)
    assert "data.root" in message and "data_batch_1" in message and "download" in message
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        create_data("cifar100", root=str(tmp_path / "nowhere"))


def test_cifar_requires_root() -> None:
    with pytest.raises(ConfigError, match=r"data\.root"):
        create_data("cifar10")


# --------------------------------------------------------------------------- imagefolder


def _write_imagefolder(root: Path, splits: dict[str, dict[str, int]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_train_and_val(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 1}})
    data = create_data("imagefolder", root=tmp_path, input_size=8)
    assert (len(data.train), len(data.val)) == (6, 3)
    assert (data.num_classes, data.in_channels, data.input_size) == (2, 3, 8)
    x, y = data.val[2]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    batches = _batches(make_loader(data.train, 4, shuffle=True, seed=0), 0)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 0, 1, 1, 1]


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "cow": 1}})
    with pytest.raises(ConfigError, match=r"data\.root"):
        create_data("imagefolder", root=tmp_path)


def test_imagefolder_missing_dirs(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"data\.root"):
        create_data("imagefolder", root=tmp_path)
    _write_imagefolder(tmp_path, {"train": {"cat": 1, "dog": 1}})
    with pytest.raises(DataNotFoundError, match="val"):
        create_data("imagefolder", root=tmp_path)
    # With val_fraction the validation images come from train/, so val/ is not needed.
    _write_imagefolder(tmp_path / "big", {"train": {"cat": 4, "dog": 4}})
    data = create_data("imagefolder", root=tmp_path / "big", val_fraction=0.5, input_size=8)
    assert (len(data.train), len(data.val)) == (4, 4)


# --------------------------------------------------------------------------- validation


def test_registered_datasets() -> None:
    assert {"digits", "synthetic", "cifar10", "cifar100", "imagefolder"} <= set(list_datasets())
    assert dataset_options("synthetic")["num_samples"] == 1024


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match=r"data\.name") as info:
        create_data("mnist")
    assert "digits" in str(info.value)


def test_unknown_option() -> None:
    with pytest.raises(ConfigError, match=r"data\.num_sampels") as info:
        create_data("synthetic", num_sampels=10)
    assert "num_samples" in str(info.value)
    with pytest.raises(ConfigError, match=r"data\.input_size"):
        create_data("digits", input_size=8)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, "half"])
def test_bad_val_fraction(fraction: object) -> None:
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        create_data("digits", val_fraction=fraction)


def test_synthetic_small_cnn_learns_it_in_two_epochs() -> None:
    from r2sweep.core.models import create_model

    torch.manual_seed(0)
    data = create_data("synthetic", seed=0)
    model = create_model(
        "small_cnn", num_classes=data.num_classes, in_channels=data.in_channels, input_size=data.input_size
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = make_loader(data.train, 64, shuffle=True, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        vx, vy = data.val.tensors
        accuracy = (model(vx).argmax(1) == vy).float().mean().item()
    assert accuracy > 0.9


def test_a_cifar_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(ConfigError, match=r"data\.root=.*data_batch_1.*not allowed in a CIFAR batch file"):
        create_data("cifar10", seed=0, root=str(tmp_path))
    assert not (tmp_path / "pwned").exists()

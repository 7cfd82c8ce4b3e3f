"""Epoch loaders whose batch order is a pure function of ``(seed, epoch)``.

A trial that is stopped, checkpointed and resumed at epoch ``k`` (Ray Tune
schedulers do this) must see exactly the batches an uninterrupted run would
have seen, otherwise a resumed trial is a different experiment. So nothing here
depends on how many epochs were iterated before, on the global RNG, or on
iterator state: call :meth:`EpochLoader.set_epoch` and iterate.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from r2sweep.core.validate import require_int

__all__ = ["EpochLoader", "make_loader", "epoch_seed"]

# Independent random streams drawn from the same (seed, epoch).
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


def epoch_seed(seed: int, epoch: int, stream: int = _ORDER_STREAM) -> int:
    """A 63-bit seed mixed from ``(seed, epoch, stream)``.

    ``SeedSequence`` hashes its inputs, so neighbouring seeds or epochs give
    unrelated streams (``seed + epoch`` would make run 1 epoch 0 equal run 0 epoch 1).
    """
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def _as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(inputs, labels)`` of an in-memory ``TensorDataset`` (or a Subset of one), else ``None``."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
    elif isinstance(dataset, Subset):
        inner = _as_tensors(dataset.dataset)
        if inner is None:
            return None
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        x, y = inner[0][index], inner[1][index]
    else:
        return None
    return x.to(torch.float32), y.to(torch.int64)


class _IsolatedRng:
    """A private copy of the global torch / ``random`` / numpy RNG state.

    With ``num_workers=0`` the DataLoader runs random transforms (torchvision
    draws from the *global* torch RNG) in this process. Swapping this state in
    around each batch makes augmentation depend only on ``(seed, epoch)`` and
    leaves the caller's RNG (dropout, init) untouched by data loading.
    """

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._state: tuple[torch.Tensor, Any, Any] | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        outer = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        try:
            if self._state is None:
                # Only the CPU generator: torch.manual_seed would also reseed CUDA.
                torch.default_generator.manual_seed(self._seed)
                random.seed(self._seed)
                np.random.seed(self._seed % 2**32)
            else:
                torch.set_rng_state(self._state[0])
                random.setstate(self._state[1])
                np.random.set_state(self._state[2])
            yield
        finally:
            self._state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
            torch.set_rng_state(outer[0])
            random.setstate(outer[1])
            np.random.set_state(outer[2])


class EpochLoader:
    """Batches of one epoch at a time; which epoch is set with :meth:`set_epoch`.

    In-memory tensor datasets are batched by slicing their tensors with a
    seeded permutation (no per-sample overhead); any other dataset goes through
    a ``DataLoader`` built for each epoch with a generator seeded from
    ``(seed, epoch)``, which fixes the shuffling and the worker seeds. Random
    augmentation is therefore reproducible too, for a given ``num_workers``
    (the random streams differ between worker counts; the sample order does not).

    Iterating twice without :meth:`set_epoch` in between repeats the same epoch.

    Args:
        dataset: yields ``(x, y)``; ``x`` float ``(C, H, W)``, ``y`` an integer label.
        batch_size: samples per batch.
        shuffle: permute the samples each epoch.
        seed: base seed of the per-epoch permutations.
        num_workers: DataLoader worker processes (file datasets only).
        drop_last: drop the final incomplete batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = require_int("train.batch_size", batch_size, 1)
        self.shuffle = bool(shuffle)
        self.seed = require_int("seed", seed, 0)
        self.num_workers = require_int("data.num_workers", num_workers, 0)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._tensors = _as_tensors(dataset)
        self._num_samples = (
            len(self._tensors[1]) if self._tensors is not None else len(dataset)  # type: ignore[arg-type]
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (epochs count from 0)."""
        self.epoch = require_int("epoch", epoch, 0)

    def __len__(self) -> int:
        if self.drop_last:
            return self._num_samples // self.batch_size
        return -(-self._num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._tensors is not None:
            return self._iter_tensors(*self._tensors)
        return self._iter_dataloader()

    def _iter_tensors(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = self._num_samples, self.batch_size
        stop = n - n % bs if self.drop_last else n
        if not self.shuffle:
            for start in range(0, stop, bs):
                yield x[start : start + bs], y[start : start + bs]
            return
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=gen)
        for start in range(0, stop, bs):
            index = order[start : start + bs]
            yield x[index], y[index]

    def _iter_dataloader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            generator=gen,
        )
        rng = _IsolatedRng(epoch_seed(self.seed, self.epoch, _AUGMENT_STREAM))
        with rng.active():
            batches = iter(loader)
        while True:
            with rng.active():
                try:
                    x, y = next(batches)
                except StopIteration:
                    return
            yield x.to(torch.float32), torch.as_tensor(y, dtype=torch.int64)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> EpochLoader:
    """Build an :class:`EpochLoader`; see there for the determinism guarantees.

    Raises:
        ConfigError: ``batch_size < 1``, ``seed < 0`` or ``num_workers < 0``.
    """
    return EpochLoader(
        dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, drop_last=drop_last
    )

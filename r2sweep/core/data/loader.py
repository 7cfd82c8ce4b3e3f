"""Epoch loaders whose batch order is a pure function of ``(seed, epoch)``.

A trial that is stopped, checkpointed and resumed at epoch ``k`` (Ray Tune
schedulers do this) must see exactly the batches an uninterrupted run would
have seen, otherwise a resumed trial is a different experiment. So nothing here
depends on how many epochs were iterated before, on the global RNG, or on
iterator state: call :meth:`EpochLoader.set_epoch` and iterate.

With worker processes (``num_workers > 0``, file-backed datasets) the workers are
kept alive across epochs (``persistent_workers``), so a worker's RNG would carry
over from epoch to epoch; instead every batch reseeds its worker from
``(seed, epoch, batch index)`` before loading it (:class:`_SeededBatches`), which
keeps the guarantee above whatever ran before in that worker, and whichever worker gets the batch.
"""

from __future__ import annotations

import random
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

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


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The augmentation seed of one batch under worker processes (see the module docstring)."""
    state = np.random.SeedSequence([seed, epoch, _AUGMENT_STREAM, batch]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class _SeededBatches(Dataset):
    """``dataset``, loaded a batch at a time, each batch under its own seed.

    The sampler hands out ``(seed, index)`` pairs; ``__getitems__`` (called by the
    DataLoader's fetcher with one batch's keys, in the worker) seeds the worker's
    torch / ``random`` / numpy RNGs, which torchvision-style transforms draw from,
    then loads the samples in order. A worker process is private, so reseeding its
    global RNGs touches nothing of the caller's.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        seed = keys[0][0]
        # Only the CPU generator: torch.manual_seed would also reseed CUDA.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return [self.dataset[index] for _, index in keys]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]


class _EpochBatches(Sampler):
    """The batches of the owner's current epoch, as ``(batch seed, index)`` lists.

    Lives in the main process and reads ``owner.epoch`` on every ``iter``, so one
    persistent DataLoader serves every epoch. The order is the one a
    ``DataLoader(shuffle=True, generator=...)`` seeded the same way yields, so the
    sample order does not depend on the number of workers.

    The owner is held weakly: a reference cycle would leave the workers to the
    garbage collector, which may finalize their queues first and then wait
    seconds per worker for a shutdown message that can no longer be sent.
    """

    def __init__(self, owner: EpochLoader) -> None:
        self._owner = weakref.ref(owner)

    def __len__(self) -> int:
        owner = self._owner()
        return 0 if owner is None else len(owner)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        o = self._owner()
        assert o is not None, "the EpochLoader owns its DataLoader"
        n, bs = o._num_samples, o.batch_size
        if o.shuffle:
            gen = torch.Generator().manual_seed(epoch_seed(o.seed, o.epoch))
            # A DataLoader draws its workers' base seed from the generator before
            # its sampler draws the permutation: the same draw keeps the same order.
            torch.empty((), dtype=torch.int64).random_(generator=gen)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        stop = n - n % bs if o.drop_last else n
        for number, start in enumerate(range(0, stop, bs)):
            seed = _batch_seed(o.seed, o.epoch, number)
            share = o._share(min(bs, stop - start))
            if share is not None:
                yield [(seed, index) for index in order[start : start + bs][share]]


class EpochLoader:
    """Batches of one epoch at a time; which epoch is set with :meth:`set_epoch`.

    In-memory tensor datasets are batched by slicing their tensors with a
    seeded permutation (no per-sample overhead); any other dataset goes through
    a ``DataLoader`` built for each epoch with a generator seeded from
    ``(seed, epoch)``, which fixes the shuffling and the augmentation seeds.
    Random augmentation is therefore reproducible too. With workers it is seeded
    per ``(seed, epoch, batch)`` and so is the same for any ``num_workers > 0``;
    it differs from ``num_workers = 0``'s stream (the sample order does not).
    Workers persist across epochs (one DataLoader per EpochLoader), prefetch
    ``prefetch_factor`` batches each and, with ``pin_memory``, hand over page-locked
    batches so that host-to-GPU copies can overlap compute.

    Iterating twice without :meth:`set_epoch` in between repeats the same epoch.

    Args:
        dataset: yields ``(x, y)``; ``x`` float ``(C, H, W)``, ``y`` an integer label.
        batch_size: samples per batch.
        shuffle: permute the samples each epoch.
        seed: base seed of the per-epoch permutations.
        num_workers: DataLoader worker processes (file datasets only).
        drop_last: drop the final incomplete batch. A shuffled loader (training's) always drops a
            final batch of one sample: BatchNorm cannot train on one value per channel, which a net
            that pools to 1x1 before a BatchNorm (most of torchvision's zoo) would give it.
        pin_memory: page-locked batches (set it when the model is on CUDA; workers only).
        prefetch_factor: batches each worker loads ahead (workers only).
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
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ) -> None:
        self.dataset = dataset
        self.batch_size = require_int("train.batch_size", batch_size, 1)
        self.shuffle = bool(shuffle)
        self.seed = require_int("seed", seed, 0)
        self.num_workers = require_int("data.num_workers", num_workers, 0)
        self.drop_last = bool(drop_last)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = require_int("prefetch_factor", prefetch_factor, 1)
        self.epoch = 0
        self._workers: DataLoader | None = None  # built on first use, kept for its persistent workers
        self._tensors = _as_tensors(dataset)
        self._num_samples = (
            len(self._tensors[1]) if self._tensors is not None else len(dataset)  # type: ignore[arg-type]
        )
        if self.shuffle and self._num_samples > 1 and self._num_samples % self.batch_size == 1:
            self.drop_last = True
        self.rank, self.ranks = 0, 1

    def shard(self, rank: int, ranks: int) -> EpochLoader:
        """Yield only rank ``rank``'s share of each batch, of ``ranks`` equal shares (data-parallel training).

        Every rank walks the same batch order and takes its contiguous slice of each
        batch, so the ranks' gradients, averaged, are the whole batch's. The shares are
        equal: the batch size must be a multiple of ``ranks``, and a final short batch
        loses its remainder (fewer than ``ranks`` samples), or is skipped when it would
        leave a rank under 2 samples (BatchNorm cannot train on one).
        """
        require_int("train.workers", ranks, 1)
        if self.batch_size % ranks:
            raise ValueError(f"train.batch_size {self.batch_size} is not a multiple of train.workers {ranks}")
        self.rank, self.ranks = require_int("rank", rank, 0), ranks
        return self

    def _share(self, size: int) -> slice | None:
        """This rank's slice of a batch of ``size`` samples, or None when the batch is skipped."""
        if self.ranks == 1:
            return slice(0, size)
        each = size // self.ranks
        if each < 2:
            return None
        return slice(self.rank * each, (self.rank + 1) * each)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (epochs count from 0)."""
        self.epoch = require_int("epoch", epoch, 0)

    def __len__(self) -> int:
        full, rest = divmod(self._num_samples, self.batch_size)
        if self.drop_last or rest == 0:
            return full
        return full + (self._share(rest) is not None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._tensors is not None:
            return self._iter_tensors(*self._tensors)
        if self.num_workers > 0:
            return self._iter_workers()
        return self._iter_dataloader()

    def _iter_tensors(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = self._num_samples, self.batch_size
        stop = n - n % bs if self.drop_last else n
        if not self.shuffle:
            for start in range(0, stop, bs):
                share = self._share(min(bs, n - start))
                if share is not None:
                    yield x[start : start + bs][share], y[start : start + bs][share]
            return
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=gen)
        for start in range(0, stop, bs):
            index = order[start : start + bs]
            share = self._share(len(index))
            if share is not None:
                yield x[index[share]], y[index[share]]

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
            # Every rank loads the whole batch here and keeps its share; with file data
            # set train.num_workers > 0, whose batches load only this rank's samples.
            share = self._share(len(y))
            if share is not None:
                yield x[share].to(torch.float32), torch.as_tensor(y[share], dtype=torch.int64)

    def _iter_workers(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._workers is None:
            self._workers = DataLoader(
                _SeededBatches(self.dataset),
                batch_sampler=_EpochBatches(self),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=True,
                # The DataLoader draws a base seed per iteration; from its own
                # generator, not the caller's global RNG (batches reseed anyway).
                generator=torch.Generator().manual_seed(self.seed),
            )
        for x, y in self._workers:
            yield x.to(torch.float32), torch.as_tensor(y, dtype=torch.int64)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> EpochLoader:
    """Build an :class:`EpochLoader`; see there for the determinism guarantees.

    Raises:
        ConfigError: ``batch_size < 1``, ``seed < 0``, ``num_workers < 0`` or ``prefetch_factor < 1``.
    """
    return EpochLoader(
        dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, drop_last=drop_last,
        pin_memory=pin_memory, prefetch_factor=prefetch_factor,
    )

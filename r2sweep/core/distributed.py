"""The process group of a data-parallel pre-training: who is rank 0, how ranks meet, what they share.

A trial with ``train.workers: N`` pre-trains over N processes (ranks) with
``torch.distributed``: gloo on the CPU, NCCL on GPUs. Rank 0 is the trial itself:
it evaluates, checkpoints, reports and runs the downstream phases; ranks 1..N-1
only train. Which processes they are, and where they run, is the launcher's
business (:mod:`r2sweep.core.data_parallel` for local processes, the Ray adapter
for a sweep's placement group); this module only needs the address rank 0 listens on.

Everything rank 0 sends the others goes as tensors: a state is ``torch.save``-d to
bytes and read back with ``weights_only=True``, so no rank unpickles another's objects.
"""

from __future__ import annotations

import hashlib
import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["World", "joined", "broadcast_state", "open_store", "CommMeter", "SINGLE", "parameters_digest"]

# A rank that does not arrive fails the others' next collective after this long (a dead
# peer's closed socket usually fails it at once). Long: between epochs the other ranks
# wait in their next all-reduce while rank 0 evaluates, which on a large validation set takes minutes.
_TIMEOUT = timedelta(minutes=30)
# How long the ranks wait for each other to start (a rank that never starts: its launcher failed).
_RENDEZVOUS = timedelta(minutes=5)


class CommMeter:
    """Counts what DDP's gradient all-reduce moves: bytes and calls per step, measured from its buckets.

    Installed as DDP's communication hook, it wraps the default all-reduce
    unchanged; the figures are what a rank hands to the collective per step (the
    gradient bytes). A ring all-reduce sends and receives ``2 (N-1) / N`` of that
    per rank, which is what the GPU scaling estimate in the benchmarks uses.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.buckets = 0
        self.steps = 0

    # Unannotated on purpose: DDP refuses a hook whose bucket annotation is not dist.GradBucket itself.
    def hook(self, process_group, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        self.bytes += buffer.numel() * buffer.element_size()
        self.buckets += 1
        group = process_group if process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        work = dist.all_reduce(buffer.div_(world_size), group=group, async_op=True)
        return work.get_future().then(lambda future: future.value()[0])

    def per_step(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"bytes_per_step": self.bytes / steps, "allreduce_calls_per_step": self.buckets / steps}


@dataclass(frozen=True)
class World:
    """One rank's view of the data-parallel group.

    ``address`` is ``HOST:PORT`` where rank 0's store listens (``store``: that store, on
    rank 0 only; the others connect to it); ``seed`` is the trial's
    (each rank's dropout stream is reseeded from ``(seed, epoch, rank)`` every epoch,
    so a resumed run draws what an uninterrupted one drew).
    """

    rank: int = 0
    size: int = 1
    address: str = ""
    seed: int = 0
    meter: CommMeter = field(default_factory=CommMeter, compare=False)
    store: Any = field(default=None, compare=False)

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that evaluates, checkpoints and reports."""
        return self.rank == 0


#: The world of an ordinary one-process trial.
SINGLE = World()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def joined(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group for the block (no-op for one rank); every rank must enter it."""
    if not world.parallel:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = world.store
    if store is None:
        host, port = world.address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world.size, is_master=False, timeout=_RENDEZVOUS)
    dist.init_process_group(backend_for(device), store=store, rank=world.rank, world_size=world.size,
                            timeout=_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast_state(state: dict[str, Any] | None, world: World, device: torch.device) -> dict[str, Any]:
    """Rank 0's ``state`` (tensors and plain data), as every rank receives it."""
    if not world.parallel:
        assert state is not None
        return state
    on = device if device.type == "cuda" else torch.device("cpu")  # NCCL moves device tensors only
    if world.main:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(on)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=on)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=on)
    dist.broadcast(size, src=0)
    if not world.main:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=on)
    dist.broadcast(payload, src=0)
    if world.main:
        assert state is not None
        return state
    return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over the ranks (unchanged for one rank)."""
    if world.parallel:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def open_store(host: str, size: int) -> tuple[Any, str]:
    """Rank 0's rendezvous store, listening on a port the system picks, and ``HOST:PORT`` for the others.

    Bound before any other rank starts: a port merely found free and bound later could
    be taken in between (Ray starts many processes that bind ports of their own).
    """
    store = dist.TCPStore(host, 0, size, is_master=True, timeout=_RENDEZVOUS, wait_for_workers=False)
    return store, f"{host}:{store.port}"


def parameters_digest(model: torch.nn.Module) -> str:
    """A digest of ``model``'s parameters (not its buffers: BatchNorm statistics are each rank's own).

    Every rank applies the same averaged gradient and the same R2 term to the same
    weights, so the ranks must end bit-identical; rank 0 compares the digests.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

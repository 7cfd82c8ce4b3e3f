"""Full-precision pre-training with R2-Loss: the loop every trial starts with.

It reads top to bottom: build the optimizer and schedule, maybe resume from a
checkpoint, then per epoch train, evaluate, report, checkpoint. The loop knows
nothing of Ray, Optuna or MLflow; it reports through a plain callback.

Reproducibility: the batch order depends only on ``(seed, epoch)`` (see
:mod:`r2sweep.core.data.loader`) and the checkpoint holds every RNG state, so a run
resumed from epoch ``k`` ends with the same weights as one never interrupted.

``train.precision`` (:mod:`r2sweep.core.precision`): ``bf16``/``fp16`` run the
model's forward under autocast; the R2 term, the parameters and the optimizer
state stay float32. ``fp32`` runs exactly the plain loop.

Data-parallel (``world``, :mod:`r2sweep.core.distributed`): every rank runs this
loop on its share of each batch, the model wrapped in DDP, which averages the
task gradients; R2 is computed on every rank from the same weights, so its term
and gradient are the same everywhere and the averaged step is the whole batch's.
Only rank 0 evaluates, checkpoints and calls ``on_epoch``; BatchNorm statistics are
each rank's own (gloo has no SyncBatchNorm), rank 0's being the ones kept.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from r2sweep.core.checkpoint import capture_rng_state, load_checkpoint, load_state, restore_rng_state, save_atomic
from r2sweep.core.config.sections import TrainConfig
from r2sweep.core.data.loader import epoch_seed
from r2sweep.core.distributed import SINGLE, World, all_sum, broadcast_state, joined
from r2sweep.core.errors import TrialDiverged
from r2sweep.core.losses import R2Loss
from r2sweep.core.precision import Precision, check_precision
from r2sweep.core.stats import weight_stats

__all__ = ["pretrain", "evaluate", "resolve_device", "make_optimizer", "make_scheduler", "EpochCallback"]

#: Called after every epoch with that epoch's metrics (``epoch`` included).
EpochCallback = Callable[[dict[str, float]], None]

CHECKPOINT_FORMAT = 1


def resolve_device(name: str, precision: str | None = None) -> torch.device:
    """``"auto"`` -> the GPU when one is present, else the CPU.

    Raises:
        ConfigError: ``precision`` (``train.precision``) cannot run on the resolved
            device (fp16 on the CPU, "auto" included).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if precision is not None:
        check_precision(precision, device)
    return device


def make_optimizer(model: nn.Module, r2: R2Loss, cfg: TrainConfig) -> torch.optim.Optimizer:
    """One group for the model, one without weight decay for R2's margins/temperatures."""
    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    r2_params = list(r2.parameters())
    if r2_params:
        groups.append({"params": r2_params, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch schedule (stepped once after every epoch)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_epochs, gamma=cfg.step_gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device, precision: str | Precision = "fp32"
) -> float:
    """Top-1 accuracy in percent (the forward under ``precision``'s autocast)."""
    amp = precision if isinstance(precision, Precision) else Precision(precision, device)
    was_training = model.training
    model.eval()
    if not amp.channels_last:
        amp.prepare(model)
    correct: Tensor | int = 0  # counted on the device, read back once (no wait per batch on a GPU)
    total = 0
    for x, y in loader:
        x, y = amp.batch(x, y)
        with amp.autocast():
            logits = model(x)
        correct = correct + (logits.argmax(1) == y).sum()
        total += y.numel()
    model.train(was_training)
    return 100.0 * int(correct) / max(total, 1)


# On a GPU, reading a loss back (.item(), a finiteness test) waits for every queued
# kernel: once per step that stalls the GPU between steps. The losses are read back
# this many steps at a time there; on the CPU there is nothing to wait for, so every
# step is checked before its optimizer step, as always.
_CUDA_READBACK_STEPS = 32


class _LossBook:
    """The epoch's task and R2 losses, read back in windows; raises on the first non-finite one.

    Data-parallel, the losses are read back once, at the epoch's end, summed over the
    ranks: a rank that saw a non-finite loss then fails every rank at the same point,
    instead of leaving the others waiting in their next all-reduce.
    """

    def __init__(self, every: int, world: World = SINGLE) -> None:
        self.every = every if not world.parallel else math.inf
        self.world = world
        self.pending: list[Tensor] = []
        self.sums = [0.0, 0.0]
        self.batches = 0

    def add(self, task_loss: Tensor, r2_loss: Tensor) -> None:
        self.pending.append(torch.stack([task_loss.detach().float(), r2_loss.detach().float()]))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack(self.pending).cpu().tolist()  # one wait for the whole window
        self.pending = []
        for task, r2 in values:
            if not math.isfinite(task + r2):
                raise TrialDiverged(
                    f"non-finite loss at batch {self.batches} (task {task:.4g}, r2 {r2:.4g}): "
                    "lower train.lr or r2.strength"
                )
            self.sums[0] += task
            self.sums[1] += r2
            self.batches += 1

    def means(self) -> dict[str, float]:
        if self.world.parallel:
            # Equal shares: the mean over ranks of each rank's mean is the whole batches' mean.
            steps = len(self.pending)
            local = torch.stack(self.pending).sum(0).cpu() if self.pending else torch.zeros(2)
            task, r2 = (all_sum(local.double(), self.world) / self.world.size).tolist()
            self.pending = []
            if not math.isfinite(task + r2):
                raise TrialDiverged(f"non-finite loss in this epoch on some rank (task {task:.4g}, r2 {r2:.4g}): "
                                    "lower train.lr or r2.strength")
            self.sums, self.batches = [task, r2], steps
        self.flush()
        return {"train/loss": self.sums[0] / max(self.batches, 1), "train/r2": self.sums[1] / max(self.batches, 1)}


def _train_one_epoch(
    model: nn.Module,
    r2: R2Loss,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    amp: Precision,
    world: World = SINGLE,
) -> dict[str, float]:
    model.train()
    book = _LossBook(_CUDA_READBACK_STEPS if amp.device.type == "cuda" else 1, world)
    for x, y in loader:
        world.meter.steps += world.parallel
        x, y = amp.batch(x, y)
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast():
            # Cross-entropy is on autocast's float32 list: the task loss is float32 too.
            task_loss = F.cross_entropy(model(x), y)
        # R2 outside autocast and after the forward pass: its ranges (max|w|,
        # margins) are float32 reductions of the float32 master weights, and its
        # (sparse) gradients reach autograd first, the dense task gradients then
        # being added into them in place.
        r2_loss = r2()
        book.add(task_loss, r2_loss)  # on the CPU: checked now, before the step
        amp.backward_step(task_loss + r2_loss, optimizer)
    return book.means()


def pretrain(
    model: nn.Module,
    r2: R2Loss,
    train_loader: Any,
    val_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_owner: str | None = None,
    device: torch.device | None = None,
    world: World = SINGLE,
) -> dict[str, float]:
    """Train ``model`` with task loss + ``r2`` for ``cfg.epochs`` epochs.

    Args:
        train_loader: an :class:`~r2sweep.core.data.EpochLoader` (anything with
            ``set_epoch`` and iteration; ``set_epoch`` fixes the batch order).
        on_epoch: called after each epoch with ``epoch``, ``train/loss``, ``train/r2``,
            ``val/top1``, ``lr``, ``time/epoch_s`` and the ``weights/*`` statistics.
        checkpoint_path: where the full state is written after every epoch; if a
            checkpoint is already there, training resumes after its epoch.
        checkpoint_owner: a fingerprint of the run that owns the checkpoint (the
            trial config's), stored with it; the caller checks it before resuming
            (:func:`r2sweep.core.trial.check_out_dir`).
        device: defaults to ``cfg.device`` resolved (a GPU when present).
        world: this process's rank in a data-parallel pre-training (every rank calls
            this with its own; ``train_loader`` sharded to match). Rank 0 alone reads
            and writes the checkpoint and evaluates; the others get its state.

    Returns:
        The metrics of the last epoch (on ranks other than 0: the training losses only).

    Raises:
        TrialDiverged: the loss became NaN or infinite.
        ConfigError: ``cfg.precision`` cannot run on the device (fp16 on the CPU).
    """
    device = device or resolve_device(cfg.device)
    with joined(world, device):
        return _pretrain(model, r2, train_loader, val_loader, cfg, on_epoch, checkpoint_path, checkpoint_owner,
                         device, world)


def _pretrain(model: nn.Module, r2: R2Loss, train_loader: Any, val_loader: Any, cfg: TrainConfig,
              on_epoch: EpochCallback | None, checkpoint_path: str | Path | None, checkpoint_owner: str | None,
              device: torch.device, world: World) -> dict[str, float]:
    amp = Precision(cfg.precision, device)
    model.to(device)
    amp.prepare(model)
    r2.to(device)
    optimizer = make_optimizer(model, r2, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    start_epoch = 0
    metrics: dict[str, float] = {}
    if world.main and checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        load_state(model, state["model"])
        r2.load_state_dict(state["r2"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        amp.load_state_dict(state.get("scaler"))
        start_epoch = state["epoch"] + 1
        metrics = dict(state["metrics"])
    forward = _data_parallel(model, device, world)
    if world.parallel:
        # DDP sent rank 0's weights and buffers; the rest of its state goes here, so every rank steps alike.
        # fp16's loss scale too: ranks scaling by different factors would average unlike gradients.
        shared = broadcast_state({"epoch": start_epoch, "r2": r2.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "scaler": amp.state_dict()}
                                 if world.main else None, world, device)
        start_epoch = int(shared["epoch"])
        r2.load_state_dict(shared["r2"])
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        amp.load_state_dict(shared["scaler"] or None)

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        if world.parallel:
            # Each rank's own dropout stream, a function of (seed, epoch, rank): resumes draw as before.
            torch.manual_seed(epoch_seed(world.seed, epoch, _RANK_STREAM + world.rank))
        r2.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        metrics = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        metrics.update(_train_one_epoch(forward, r2, train_loader, optimizer, amp, world))
        scheduler.step()
        if not world.main:
            continue
        metrics["val/top1"] = evaluate(model, val_loader, device, amp)
        metrics.update(weight_stats(model))
        metrics["time/epoch_s"] = time.perf_counter() - started
        if checkpoint_path is not None:
            # fp16's loss scale is part of the state: a resumed run must not restart it at 2^16.
            extra = {"scaler": amp.state_dict()} if amp.scaler is not None else {}
            save_atomic(
                {
                    **extra,
                    "format": CHECKPOINT_FORMAT,
                    "owner": checkpoint_owner,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "r2": r2.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": capture_rng_state(),
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                },
                checkpoint_path,
            )
        if on_epoch is not None:
            on_epoch(dict(metrics))
    return metrics


# The loader's streams are 0 and 1 (r2sweep.core.data.loader); ranks draw from 16 on.
_RANK_STREAM = 16


def _data_parallel(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """``model`` wrapped in DDP for a data-parallel world (its gradient all-reduce metered), else itself."""
    if not world.parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=[index] if index is not None else None)
    wrapped.register_comm_hook(None, world.meter.hook)
    return wrapped

"""The training-based downstream methods: QAT (LSQ, LSQ+, EWGS) and DKM weight clustering.

Both start from a copy of the pre-trained float model, put quantizers on every
conv (1d/2d/3d) and Linear layer (see :mod:`r2sweep.core.quant.layers`) and fine-tune the whole network
for ``epochs`` with the task loss only (no R2: the question a trial answers is
how well an R2-pre-trained model survives a standard low-bit recipe).

BatchNorm stays unfolded and keeps training: in a deployed network it becomes
the per-channel requantization multiplier, which the weight quantizers here do
not constrain. Evaluation runs the model in eval mode: LSQ/EWGS quantize with
their learned steps and DKM snaps each weight to its nearest centroid.

Fine-tuning runs at the trial's ``train.precision`` (:mod:`r2sweep.core.precision`):
the network's forward under autocast, while the quantizers compute their steps,
intervals and centroids in float32 (they switch autocast off inside), so a
``bf16`` trial fine-tunes against the same grids a ``fp32`` one would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from r2sweep.core.errors import TrialDiverged
from r2sweep.core.precision import Precision
from r2sweep.core.quant.dkm import DkmClusterer
from r2sweep.core.quant.graph import edge_layers
from r2sweep.core.quant.layers import (
    LayerInfo,
    input_is_nonnegative,
    layer_bits,
    wrap_layers,
)
from r2sweep.core.quant.lsq_plus import LsqPlusQuantizer
from r2sweep.core.quant.qat import EwgsQuantizer, LsqQuantizer

if TYPE_CHECKING:  # the configs import this module (their handlers run it)
    from r2sweep.core.quant.methods import DKMConfig, FineTuneConfig, QATConfig

__all__ = ["dkm_compress", "fine_tune", "quantization_aware_train", "quantizer_parameters"]

#: Called after each fine-tuning epoch with ``(epoch, mean task loss)``.
EpochProgress = Callable[[int, float], None]


def _weight_channels(cfg: QATConfig, info: LayerInfo) -> int | None:
    return info.out_channels if cfg.granularity == "channel" else None


def _qat_factories(cfg: QATConfig, weight_bits: int, nonnegative: dict[str, bool]):
    def weight(info: LayerInfo) -> nn.Module:
        bits = layer_bits(info.first_or_last, weight_bits, cfg.keep_first_last_bits)
        channels = _weight_channels(cfg, info)
        if cfg.algorithm == "lsq":
            return LsqQuantizer(bits, True, channels)
        if cfg.algorithm == "lsqplus":
            return LsqPlusQuantizer(bits, channels)
        return EwgsQuantizer(bits, True, cfg.delta, channels)

    def activation(info: LayerInfo) -> nn.Module:
        if cfg.float_activations:
            return nn.Identity()
        bits = layer_bits(info.first_or_last, cfg.act_bits, cfg.keep_first_last_bits)
        signed = not nonnegative[info.name]
        if cfg.algorithm == "lsq":
            return LsqQuantizer(bits, signed, per_sample=True, field="downstream.act_bits")
        if cfg.algorithm == "lsqplus":  # an offset whatever the sign: a ReLU output starts with it at 0
            return LsqPlusQuantizer(bits, per_sample=True, field="downstream.act_bits")
        return EwgsQuantizer(bits, signed, cfg.delta, field="downstream.act_bits", cover_mse_range=True)

    return weight, activation


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of the quantizers (steps, intervals), not the network's."""
    return [p for name, p in model.named_parameters() if "_quantizer." in name and p.requires_grad]


def fine_tune(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: FineTuneConfig,
    device: torch.device,
    *,
    on_epoch: EpochProgress | None = None,
    precision: str = "fp32",
) -> None:
    """SGD (momentum 0.9, cosine schedule) on the task loss for ``cfg.epochs`` epochs.

    Network weights use ``cfg.lr`` and ``cfg.weight_decay``; quantizer
    parameters use ``cfg.quantizer_lr`` (QAT's ``quant_lr``, else ``cfg.lr``) and no weight decay,
    which would otherwise shrink every step size towards zero.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (``train.precision``; a handler passes
            its :class:`~r2sweep.core.quant.methods.DownstreamContext`'s).

    Raises:
        TrialDiverged: the loss became NaN or infinite.
        ConfigError: ``precision`` cannot run on ``device`` (fp16 on the CPU).
    """
    if cfg.epochs == 0:
        return
    amp = Precision(precision, device)
    amp.prepare(model)
    quantizer_ids = {id(p) for p in quantizer_parameters(model)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in quantizer_ids and p.requires_grad], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if id(p) in quantizer_ids], "weight_decay": 0.0, "lr": cfg.quantizer_lr},
    ]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    for epoch in range(cfg.epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        model.train()
        total, batches = 0.0, 0
        for x, y in train_loader:
            x, y = amp.batch(x, y)
            with amp.autocast():
                loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise TrialDiverged(f"non-finite loss in {cfg.method} fine-tuning, epoch {epoch}: lower downstream.lr")
            optimizer.zero_grad(set_to_none=True)
            amp.backward_step(loss, optimizer)
            total += loss.item()
            batches += 1
        scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch, total / max(batches, 1))
    model.eval()


@torch.no_grad()
def _initialize_quantizers(model: nn.Module, calibration: Tensor) -> None:
    # LSQ/EWGS initialize lazily from the first tensor they see: one eval pass
    # over calibration images sets every step from real data, not a single batch
    # in train mode.
    was_training = model.training
    model.eval()
    model(calibration)
    model.train(was_training)


def quantization_aware_train(
    model: nn.Module,
    cfg: QATConfig,
    weight_bits: int,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    calibration: Tensor,
    device: torch.device,
    *,
    on_epoch: EpochProgress | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """A QAT-fine-tuned, fake-quantized copy of ``model`` (``model`` is not changed), in eval mode.

    Args:
        cfg: a ``method: qat`` entry (``algorithm`` lsq, lsqplus or ewgs).
        weight_bits: bits of every layer but the first and last (those get
            ``cfg.keep_first_last_bits`` when set); activations at ``cfg.act_bits``.
        calibration: a batch of training images that initializes the quantizers
            (in float32, outside autocast, whatever ``precision``).
        precision: see :func:`fine_tune`.
    """
    quantized = copy.deepcopy(model).to(device)
    calibration = calibration.to(device)
    nonnegative = input_is_nonnegative(quantized, [calibration], num_batches=1)
    # ``model``'s edges (its trace is cached) are the copy's: same names, same graph.
    wrap_layers(quantized, *_qat_factories(cfg, weight_bits, nonnegative), edge_layers(model))
    quantized.to(device)
    _initialize_quantizers(quantized, calibration)
    fine_tune(quantized, train_loader, cfg, device, on_epoch=on_epoch, precision=precision)
    return quantized.eval()


def dkm_compress(
    model: nn.Module,
    cfg: DKMConfig,
    weight_bits: int,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    on_epoch: EpochProgress | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """A DKM-clustered copy of ``model``, fine-tuned with soft clustering, in eval mode.

    In eval mode every clustered layer uses hard assignment: at most
    ``2^bits`` distinct weight values per layer (``cluster_dim = 1``).
    :func:`~r2sweep.core.quant.layers.bake_weights` writes them into the weights for export.
    """
    quantized = copy.deepcopy(model).to(device)

    def weight(info: LayerInfo) -> nn.Module:
        bits = layer_bits(info.first_or_last, weight_bits, cfg.keep_first_last_bits)
        return DkmClusterer(bits, cfg.tau, cfg.dkm_iters, cfg.cluster_dim)

    wrap_layers(quantized, weight, lambda info: nn.Identity(), edge_layers(model))
    quantized.to(device)
    fine_tune(quantized, train_loader, cfg, device, on_epoch=on_epoch, precision=precision)
    return quantized.eval()


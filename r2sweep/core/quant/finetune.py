"""The training-based downstream methods: QAT (LSQ, LSQ+, EWGS) and DKM weight clustering.

Both start from a copy of the pre-trained float model, put quantizers on every
conv (1d/2d/3d) and Linear layer (see :mod:`r2sweep.core.quant.layers`) and fine-tune the whole network
for ``epochs`` with the task loss only (no R2: the question a trial answers is
how well an R2-pre-trained model survives a standard low-bit recipe).

BatchNorm stays unfolded and keeps training: in a deployed network it becomes
the per-channel requantization multiplier, which the weight quantizers here do
not constrain. Evaluation runs the model in eval mode: LSQ/EWGS quantize with
their learned steps and DKM snaps each weight to its nearest centroid.

The loop they share, its recipe and what it keeps: :mod:`r2sweep.core.quant.fine_tune_loop`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from r2sweep.core.graph import edge_layers
from r2sweep.core.quant.dkm import DkmClusterer
from r2sweep.core.quant.fine_tune_loop import EpochProgress, FineTuneOutcome, Recipe, Score, fine_tune
from r2sweep.core.quant.layers import (
    LayerInfo,
    input_is_nonnegative,
    layer_bits,
    wrap_layers,
)
from r2sweep.core.quant.lsq_plus import LsqPlusQuantizer
from r2sweep.core.quant.qat import EwgsQuantizer, LsqQuantizer

if TYPE_CHECKING:  # the configs import this module (their handlers run it)
    from r2sweep.core.quant.methods import DKMConfig, QATConfig

__all__ = ["dkm_compress", "quantization_aware_train"]


def _weight_channels(cfg: QATConfig, info: LayerInfo) -> int | None:
    return info.out_channels if cfg.granularity == "channel" else None


def _qat_factories(cfg: QATConfig, weight_bits: int, nonnegative: dict[str, bool]):
    def weight(info: LayerInfo) -> nn.Module:
        bits = layer_bits(info.first_or_last, weight_bits, cfg.keep_first_last_bits)
        channels = _weight_channels(cfg, info)
        if cfg.algorithm == "lsq":
            return LsqQuantizer(bits, True, channels, mse_start=cfg.start == "ptq")
        if cfg.algorithm == "lsqplus":
            return LsqPlusQuantizer(bits, channels)
        return EwgsQuantizer(bits, True, cfg.delta, channels)

    def activation(info: LayerInfo) -> nn.Module:
        if cfg.float_activations:
            return nn.Identity()
        bits = layer_bits(info.first_or_last, cfg.act_bits, cfg.keep_first_last_bits)
        signed = not nonnegative[info.name]
        if cfg.algorithm == "lsq":
            return LsqQuantizer(bits, signed, per_sample=True, field="downstream.act_bits", mse_start=cfg.start == "ptq")
        if cfg.algorithm == "lsqplus":  # an offset whatever the sign: a ReLU output starts with it at 0
            return LsqPlusQuantizer(bits, per_sample=True, field="downstream.act_bits")
        return EwgsQuantizer(bits, signed, cfg.delta, field="downstream.act_bits", cover_mse_range=True)

    return weight, activation


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
    recipe: Recipe | None = None,
    score: Score | None = None,
    on_done: Callable[[FineTuneOutcome], None] | None = None,
) -> nn.Module:
    """A QAT-fine-tuned, fake-quantized copy of ``model`` (``model`` is not changed), in eval mode.

    Args:
        cfg: a ``method: qat`` entry (``algorithm`` lsq, lsqplus or ewgs).
        weight_bits: bits of every layer but the first and last (those get
            ``cfg.keep_first_last_bits`` when set); activations at ``cfg.act_bits``.
        calibration: a batch of training images that initializes the quantizers
            (in float32, outside autocast, whatever ``precision``). With ``start: ptq``
            (LSQ's default) they start on PTQ's MSE grid of these images and weights.
        precision, recipe, score: see :func:`fine_tune` (recipe None: ``cfg.recipe()``).
        on_done: receives the :class:`FineTuneOutcome`.
    """
    quantized = copy.deepcopy(model).to(device)
    calibration = calibration.to(device)
    nonnegative = input_is_nonnegative(quantized, [calibration], num_batches=1)
    # ``model``'s edges (its trace is cached) are the copy's: same names, same graph.
    wrap_layers(quantized, *_qat_factories(cfg, weight_bits, nonnegative), edge_layers(model))
    quantized.to(device)
    _initialize_quantizers(quantized, calibration)
    outcome = fine_tune(quantized, train_loader, cfg, device, on_epoch=on_epoch, precision=precision,
                        recipe=recipe, score=score)
    if on_done is not None:
        on_done(outcome)
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
    recipe: Recipe | None = None,
    score: Score | None = None,
    on_done: Callable[[FineTuneOutcome], None] | None = None,
) -> nn.Module:
    """A DKM-clustered copy of ``model``, fine-tuned with soft clustering, in eval mode.

    In eval mode every clustered layer uses hard assignment: at most
    ``2^bits`` distinct weight values per layer (``cluster_dim = 1``).
    :func:`~r2sweep.core.quant.layers.bake_weights` writes them into the weights for export.
    The other arguments are :func:`quantization_aware_train`'s.
    """
    quantized = copy.deepcopy(model).to(device)

    def weight(info: LayerInfo) -> nn.Module:
        bits = layer_bits(info.first_or_last, weight_bits, cfg.keep_first_last_bits)
        return DkmClusterer(bits, cfg.tau, cfg.dkm_iters, cfg.cluster_dim)

    wrap_layers(quantized, weight, lambda info: nn.Identity(), edge_layers(model))
    quantized.to(device)
    outcome = fine_tune(quantized, train_loader, cfg, device, on_epoch=on_epoch, precision=precision,
                        recipe=recipe, score=score)
    if on_done is not None:
        on_done(outcome)
    return quantized.eval()


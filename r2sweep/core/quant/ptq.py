"""Post-training quantization: round-to-nearest, AdaRound, BRECQ or QDrop weights, calibrated activations.

The order follows deployment: fold BatchNorm into the preceding convs (the
integer kernel sees the folded weight), quantize the weights layer by layer,
then calibrate one activation quantizer per layer input on a few batches.
BRECQ and QDrop (:mod:`r2sweep.core.quant.reconstruct`) calibrate the activations
first instead, because they reconstruct each block with its activations
quantized (and learn their steps), block after block.

With ``bn_fold: false`` the BNs are *not* folded: weights are quantized as they
are and BN stays a per-channel float affine (which a deployment folds into the
per-channel requantization multiplier instead of the weights). This matters for
R2, which restricts the range of the unfolded weight: folding multiplies each
output channel by ``gamma / sqrt(var)``, which can re-create the outliers R2
removed (MobileNet-V2's depthwise layers, see benchmarks/RESULTS.md).
``bn_reestimate`` (which implies ``bn_fold: false``) then recomputes the BN
running statistics on training batches after quantization, undoing the
activation shift that low-bit weights cause.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from r2sweep.core.quant.adaround import adaround_layer
from r2sweep.core.quant.fake import ActivationQuantizer, QuantSpec, quantize_weight
from r2sweep.core.quant.fold import conv_bn_pairs, fold_batchnorm, reestimate_bn
from r2sweep.core.graph import edge_layers, low_bit_layers
from r2sweep.core.quant.layers import (
    LayerInfo,
    QuantLayer,
    input_is_nonnegative,
    layer_bits,
    quant_layers,
    wrap_layers,
)
# _CHUNK: calibration inputs go through the network in chunks of this size, decided in one place.
from r2sweep.core.quant.reconstruct import _CHUNK, NotCalled, capture, reconstruct_model

if TYPE_CHECKING:  # the configs import this module (their handlers run it)
    from r2sweep.core.quant.methods import MethodConfig, PTQConfig

__all__ = ["RECONSTRUCTIONS", "post_training_quantize", "round_to_nearest"]

#: The algorithms that reconstruct block by block (their activations calibrated first).
RECONSTRUCTIONS = ("brecq", "qdrop")


def _input_quantizer_factory(cfg: PTQConfig, nonnegative: dict[str, bool]):
    def make(info: LayerInfo) -> nn.Module:
        if cfg.float_activations:
            return nn.Identity()
        bits = layer_bits(info.first_or_last, cfg.act_bits, cfg.keep_first_last_bits)
        return ActivationQuantizer(bits, signed=not nonnegative[info.name], observer=cfg.act_observer)

    return make


def _weight_spec(cfg: PTQConfig, wrapper: QuantLayer, weight_bits: int) -> QuantSpec:
    bits = layer_bits(wrapper.first_or_last, weight_bits, cfg.keep_first_last_bits)
    return QuantSpec(bits, cfg.symmetric, cfg.granularity, cfg.range)


def post_training_quantize(
    model: nn.Module,
    cfg: PTQConfig,
    weight_bits: int,
    calibration: Tensor,
    bn_batches: Iterable[object] | None = None,
    *,
    seed: int = 0,
    labels: Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """A quantized copy of ``model`` (which is not changed), in eval mode.

    Args:
        cfg: a ``method: ptq`` entry (``algorithm`` rtn, adaround, brecq or qdrop).
        weight_bits: the bit width of every layer but the first and last
            (those get ``cfg.keep_first_last_bits`` when it is set).
        calibration: model inputs ``(N, ...)`` (images ``(N, C, H, W)``, audio
            features ``(N, C, T)``) for AdaRound and the activation ranges
            (``cfg.calib_samples`` of the training set).
        bn_batches: training batches for BN re-estimation (``cfg.bn_reestimate``).
        seed: AdaRound's batch sampling (and QDrop's dropping).
        labels: ``calibration``'s labels: BRECQ's and QDrop's Fisher weighting (``cfg.fisher``).
        progress: BRECQ and QDrop say which unit they reconstruct, and any layer-wise fallback.
    """
    if cfg.bn_reestimate and bn_batches is None:
        raise ValueError("bn_reestimate needs bn_batches (training batches)")
    quantized = fold_batchnorm(model) if cfg.bn_fold else copy.deepcopy(model).eval()
    reference = copy.deepcopy(quantized)  # float, for AdaRound's targets
    calibration = calibration.to(next(model.parameters()).device)
    nonnegative = input_is_nonnegative(quantized, [calibration[:_CHUNK]], num_batches=1)
    # ``model``'s edges (cached) are the copy's: folding keeps every layer's name and place.
    edges = edge_layers(model)
    wrap_layers(quantized, lambda info: nn.Identity(), _input_quantizer_factory(cfg, nonnegative), edges)
    specs = {name: _weight_spec(cfg, wrapper, weight_bits) for name, wrapper in quant_layers(quantized)}
    # Unfolded, AdaRound reconstructs each conv's BatchNorm output, not the raw conv output
    # (an untraceable model has no pairs: its convs' raw outputs, then).
    following_bn = dict(conv_bn_pairs(model)) if cfg.algorithm != "rtn" and not cfg.bn_fold else {}

    if cfg.algorithm in RECONSTRUCTIONS:
        if not cfg.float_activations:
            _calibrate_activations(quantized, calibration)
        reconstruct_model(quantized, reference, specs, calibration,
                          labels.to(calibration.device) if labels is not None else None,
                          cfg.reconstruction_settings(seed), following_bn=following_bn, progress=progress)
    else:
        _quantize_layer_by_layer(quantized, reference, cfg, specs, calibration, following_bn, seed)

    if cfg.bn_reestimate:
        reestimate_bn(quantized, bn_batches, cfg.bn_batches)
    if not cfg.float_activations and cfg.algorithm not in RECONSTRUCTIONS:
        _calibrate_activations(quantized, calibration)
    return quantized.eval()


def _quantize_layer_by_layer(quantized: nn.Module, reference: nn.Module, cfg: PTQConfig, specs: dict[str, QuantSpec],
                             calibration: Tensor, following_bn: dict[str, str], seed: int) -> None:
    # Weights first, with float activations (the activation quantizers pass
    # through until calibrated), so AdaRound sees each layer's true inputs.
    reference_layers = dict(reference.named_modules())
    for name, wrapper in quant_layers(quantized):
        weight = wrapper.layer.weight
        new_weight = None
        if cfg.algorithm == "adaround":
            target_module = reference_layers[following_bn.get(name, name)]
            after = target_module if name in following_bn else None
            try:
                inputs = capture(quantized, wrapper, calibration, output=False)
                targets = capture(reference, target_module, calibration, output=True)
            except NotCalled:
                pass  # its parent reads its weight (attention's out_proj): rounded to nearest below
            else:
                new_weight = adaround_layer(wrapper.layer, inputs, targets, specs[name], cfg.adaround_settings(seed),
                                            after=after)
        if new_weight is None:
            new_weight = quantize_weight(weight.detach(), specs[name])
        with torch.no_grad():
            weight.copy_(new_weight)


@torch.no_grad()
def _calibrate_activations(model: nn.Module, calibration: Tensor) -> None:
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    for q in quantizers:
        q.reset()
        q.calibrating = True
    try:
        model.eval()
        for start in range(0, calibration.shape[0], _CHUNK):
            model(calibration[start : start + _CHUNK])
    finally:
        for q in quantizers:
            q.calibrating = False


def round_to_nearest(model: nn.Module, cfg: MethodConfig, weight_bits: int) -> nn.Module:
    """Weights-only round-to-nearest on ``cfg``'s grid (:meth:`~r2sweep.core.quant.methods.MethodConfig.rounding`:
    BN folded as it says, no re-estimation): the cheap per-epoch proxy, for an entry of any method.

    The first and last layers are :func:`~r2sweep.core.graph.edge_layers`'s, as in
    :func:`post_training_quantize`, so the proxy and the real PTQ keep the same layers
    at ``keep_first_last_bits``. ``model``'s trace is cached, so calling this every
    epoch traces it once."""
    grid = cfg.rounding()
    edges = edge_layers(model)
    folded = fold_batchnorm(model) if grid.bn_fold else copy.deepcopy(model).eval()
    layers = low_bit_layers(folded)
    with torch.no_grad():
        for name, layer in layers:
            bits = layer_bits(edges.first_or_last(name), weight_bits, grid.keep_first_last_bits)
            layer.weight.copy_(quantize_weight(layer.weight, QuantSpec(bits, grid.symmetric, grid.granularity, grid.range)))
    return folded

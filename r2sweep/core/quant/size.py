"""A result's size in bytes at its bit width: what a runtime must hold to run it.

The accounting is the layout of a packed low-bit model:

* each quantized layer's weight as :mod:`r2sweep.core.quant.packing` packs it:
  integer codes bit-packed at the layer's width (its nominal bit width, ``widths``;
  where a channel holds more distinct values than that indexes, the fewest bits
  that do), plus the grids that decode them bit for bit: a step and an offset
  (8 bytes) per uniform grid, else a float32 table of the values (DKM's
  centroids); one grid per layer when every output channel's values fit one,
  else one per channel;
* each quantized activation's scale and zero point (8 bytes);
* everything else the model holds (biases, BatchNorm, layers left in float) as float32.

The weights come from the layers as evaluation uses them, so the figure is the
size of exactly what the trial scored, whatever method made it. ``fp32_bytes`` is
the same model's parameters and floating buffers at 4 bytes each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from r2sweep.core.quant.layers import QuantLayer
from r2sweep.core.quant.packing import UNIFORM_GRID_BYTES, pack_weight

__all__ = ["SizeReport", "model_size", "fp32_bytes", "GRID_BYTES"]

#: A uniform grid's step and offset, or an activation's scale and zero point: 4 bytes each.
GRID_BYTES = UNIFORM_GRID_BYTES
_FLOAT_BYTES = 4
# Above this many distinct values a layer's weight is not low-bit: it stays float32.
_MAX_LEVELS = 256


@dataclass(frozen=True)
class SizeReport:
    """Bytes of a model at its bit widths, split by what they hold."""

    codes: int  # packed weight codes of the quantized layers
    grids: int  # scales, zero points and lookup tables (weights and activations)
    floats: int  # everything kept in float32
    fp32: int  # the same model entirely in float32

    @property
    def total(self) -> int:
        return self.codes + self.grids + self.floats

    @property
    def ratio(self) -> float:
        """``total`` over the float32 model's bytes."""
        return self.total / max(self.fp32, 1)


def fp32_bytes(model: nn.Module) -> int:
    """The model's parameters and floating buffers at 4 bytes each (QuantLayers count their original layer)."""
    quantizers = _quantizer_modules(model)
    return sum(_own_float_bytes(m) for m in model.modules() if id(m) not in quantizers)


def _own_float_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() for t in tensors if t.is_floating_point()) * _FLOAT_BYTES


def _quantizer_modules(model: nn.Module) -> set[int]:
    """Ids of the modules inside QuantLayers' quantizers: their state (AdaRound's logits, LSQ's
    steps, DKM's soft assignments) is how the grid was found, not what a runtime holds."""
    return {id(q) for layer in model.modules() if isinstance(layer, QuantLayer)
            for q in (*layer.weight_quantizer.modules(), *layer.input_quantizer.modules())}


def _weight_bytes(weight: Tensor, nominal: int) -> tuple[int, int] | None:
    """(code bytes, grid bytes) of one layer's quantized weight packed (:mod:`~r2sweep.core.quant.packing`),
    or None when it is not low-bit."""
    rows = weight.detach().reshape(weight.shape[0], -1).float().cpu().sort(1).values
    most = int(((rows.diff(dim=1) != 0).sum(1) + 1).max())
    if most > _MAX_LEVELS:
        return None
    packed = pack_weight(weight, max(nominal, math.ceil(math.log2(most)), 1))
    return len(packed.codes), packed.nbytes - len(packed.codes)


@torch.no_grad()
def model_size(quantized: nn.Module, reference: nn.Module | None = None,
               widths: Callable[[QuantLayer], int] | None = None) -> SizeReport:
    """The bytes ``quantized`` needs at its bit widths; ``fp32`` from ``reference`` (default: ``quantized`` itself).

    ``widths`` gives a layer's nominal bit width (the result's, or ``keep_first_last_bits``
    for the first and last layers); default: the fewest bits that index its values.
    """
    codes = grids = floats = 0
    skipped = _quantizer_modules(quantized) | {id(m.layer) for m in quantized.modules() if isinstance(m, QuantLayer)}
    for module in quantized.modules():
        if isinstance(module, QuantLayer):
            packed = _weight_bytes(module.quantized_weight(), widths(module) if widths is not None else 1)
            weight = module.layer.weight
            if packed is None:
                floats += weight.numel() * _FLOAT_BYTES
            else:
                codes += packed[0]
                grids += packed[1]
            if not isinstance(module.input_quantizer, nn.Identity):
                grids += GRID_BYTES
            if module.layer.bias is not None:
                floats += module.layer.bias.numel() * _FLOAT_BYTES
            continue
        if id(module) not in skipped:  # not a quantizer's state, nor a layer its QuantLayer counted
            floats += _own_float_bytes(module)
    return SizeReport(codes, grids, floats, fp32_bytes(reference if reference is not None else quantized))

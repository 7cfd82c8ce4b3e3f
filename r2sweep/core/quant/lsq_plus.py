"""LSQ+ (Bhalgat et al. 2020): LSQ with a learnable offset for activations, and a better start.

LSQ (:class:`r2sweep.core.quant.qat.LsqQuantizer`) puts every activation on a grid
that starts at zero (unsigned) or is centred on it (signed). That wastes levels on
activations that are not ReLU outputs (MobileNet-V2's linear bottlenecks and its
residual sums, anything after a Swish), and at 2 bits there are only four. LSQ+
gives an activation quantizer an offset ``beta`` learned with the step:

    x_hat = round(clamp((x - beta) / s, 0, 2^b - 1)) * s + beta

with the straight-through estimator on ``round``. Its gradients, with LSQ's scale
``g = 1 / sqrt(N * Qp)`` on both: for ``s``, ``round(u) - u`` inside the grid and
``0`` / ``Qp`` where clipped low / high (``u = (x - beta) / s``); for ``beta``, ``0``
inside and ``1`` where clipped (moving the grid moves a clipped value with it).
Autograd derives both from the formula above.

Weights keep LSQ's symmetric signed grid (no offset: a zero weight must stay zero)
but start where LSQ+ starts them, ``s = max(|mean - 3 std|, |mean + 3 std|) / 2^(b-1)``;
LSQ's ``2 mean|x| / sqrt(Qp)`` is several times too small at 2 bits, so the first
steps of training must undo it. Activations start from the first tensor's range
(see :meth:`LsqPlusQuantizer._initialize`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from r2sweep.core.precision import full_precision
from r2sweep.core.quant.learned import (
    MIN_STEP,
    as_rows,
    clamp_inclusive,
    compute_dtype,
    floor_ste,
    grad_scale,
    ste,
)
from r2sweep.core.quant.qat import LsqQuantizer

__all__ = ["LsqPlusQuantizer"]

#: Activation ranges start at ``mean + ACT_STDS * std`` (cut to the data's range), as EWGS's.
ACT_STDS = 3.0


class LsqPlusQuantizer(LsqQuantizer):
    """LSQ+ fake quantizer: a learnable step, and for activations a learnable offset.

    Args:
        bits: bit width, 1 to 8.
        offset: an activation quantizer: the unsigned grid ``[0, 2^b - 1]`` shifted by a
            learnable ``beta`` (whatever the sign of the data). False: a weight
            quantizer on LSQ's symmetric signed grid, no offset.
        num_channels: one step per slice along dim 0 (weights only).
        per_sample: dim 0 is a batch (activations): ``N = x[0].numel()`` in LSQ's scale.
        field: the config field ``bits`` came from, named in errors.

    Raises:
        ConfigError: an invalid argument; the message names the field.
    """

    def __init__(
        self,
        bits: int,
        offset: bool,
        num_channels: int | None = None,
        *,
        per_sample: bool = False,
        field: str = "downstream.weight_bits",
    ) -> None:
        super().__init__(bits, not offset, num_channels, per_sample=per_sample, field=field)
        self.has_offset = offset
        shape = () if num_channels is None else (num_channels,)
        # 0.0 is a placeholder until the first forward overwrites it in place; weights keep it.
        self.offset = nn.Parameter(torch.zeros(shape), requires_grad=offset)

    def _initialize(self, x: Tensor) -> None:
        rows = as_rows(x.to(self._stats_dtype(x)), self.num_channels)
        mean, std = rows.mean(dim=1), rows.std(dim=1, correction=0)
        if not self.has_offset:
            if self.binary:
                step = rows.abs().mean(dim=1)  # the least-squares s of s * sign(x), as LSQ
            else:
                step = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs()) / 2 ** (self.bits - 1)
            self.step.copy_(step.reshape(self.step.shape))
            return
        # Activations: [max(min, mean - 3 std), min(max, mean + 3 std)]. The data's own
        # min/max (LSQ+'s first rule) lets one outlier of a calibration batch take most of
        # four levels; the 3-std cut keeps them where the values are, and a ReLU output
        # (min 0) keeps zero exactly representable.
        low = torch.maximum(rows.amin(dim=1), mean - ACT_STDS * std)
        high = torch.minimum(rows.amax(dim=1), mean + ACT_STDS * std)
        self.step.copy_(((high - low) / self.qp).reshape(self.step.shape))
        self.offset.copy_(low.reshape(self.offset.shape))

    def forward(self, x: Tensor) -> Tensor:
        # Autocast off: the step, the offset and their statistics stay float32.
        with full_precision(x):
            return self._quantize_with_offset(x) if self.has_offset else self._quantize(x)

    def _quantize_with_offset(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        self._maybe_initialize(x)
        dtype = compute_dtype(x, self.step)
        scale = self.grad_scale(x)
        s = self._broadcast(floor_ste(grad_scale(self.step, scale).to(dtype), MIN_STEP), x)
        beta = self._broadcast(grad_scale(self.offset, scale).to(dtype), x)
        u = clamp_inclusive((x.to(dtype) - beta) / s, 0.0, self.qp)
        return (ste(torch.round(u), u) * s + beta).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, offset={self.has_offset}, num_channels={self.num_channels}, per_sample={self.per_sample}"

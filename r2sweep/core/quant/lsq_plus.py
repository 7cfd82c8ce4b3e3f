"""LSQ+ (Bhalgat et al. 2020): LSQ with a learnable offset for activations, and a better start.

LSQ (:class:`r2sweep.core.quant.qat.LsqQuantizer`) puts every activation on a grid
that starts at zero (unsigned) or is centred on it (signed). That wastes levels on
activations that are not ReLU outputs (MobileNet-V2's linear bottlenecks and its
residual sums, anything after a Swish), and at 2 bits there are only four. LSQ+
gives a quantizer an offset ``beta`` learned with the step:

    x_hat = round(clamp((x - beta) / s, 0, 2^b - 1)) * s + beta

with the straight-through estimator on ``round``. Its gradients, with LSQ's scale
``g = 1 / sqrt(N * Qp)`` on both: for ``s``, ``round(u) - u`` inside the grid and
``0`` / ``Qp`` where clipped low / high (``u = (x - beta) / s``); for ``beta``, ``0``
inside and ``1`` where clipped (moving the grid moves a clipped value with it).
Autograd derives both from the formula above.

Both steps are learned as their logarithm, ``s = exp(log_step)``. Learned directly, as
in LSQ, a step moves by ``lr`` times its gradient whatever its own size: measured on
MobileNet-V1 (benchmarks/RESULTS.md, LSQ+), an 8-bit activation step of 0.01 went below
zero within two batches at the recipe's lr 0.01, and the network never left chance. In
the logarithm every update is relative to the step, and a step cannot change sign.

Weights get the same grid, per channel, as EWGS's weights have (an interval that need
not be centred on zero). LSQ+ keeps LSQ's symmetric signed grid for weights; measured on
MobileNet-V1 at W2A2 (benchmarks/RESULTS.md, LSQ+), that grid stayed at chance (10.1), a
grid centred on zero without a zero level trained to 45.4, and this one to 52.1.
Both sides start from the first tensor's range (:meth:`LsqPlusQuantizer._initialize`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from r2sweep.core.precision import full_precision
from r2sweep.core.quant.learned import (
    MIN_STEP,
    LazyQuantizer,
    as_rows,
    clamp_inclusive,
    compute_dtype,
    elements_per_step,
    floor_ste,
    grad_scale,
    mse_interval,
    ste,
    validate_common,
)
from r2sweep.core.validate import check

__all__ = ["LsqPlusQuantizer"]

#: Ranges start at ``mean +- STDS * std`` cut to the data's own range (activations: at least the MSE grid's).
STDS = 3.0


class LsqPlusQuantizer(LazyQuantizer):
    """LSQ+ fake quantizer: ``round(clamp((x - beta) / s, 0, 2^b - 1)) * s + beta``, ``s`` and ``beta`` learned.

    Args:
        bits: bit width, 1 to 8.
        num_channels: one step and offset per slice along dim 0 (per output channel of a
            weight); None for one of each for the whole tensor.
        per_sample: an activation quantizer: ``x``'s dim 0 is a batch, ``N = x[0].numel()``
            in LSQ's gradient scale, and the range starts at least as wide as the MSE-optimal
            grid's. Not combinable with ``num_channels``.
        field: the config field ``bits`` came from, named in errors.

    Raises:
        ConfigError: an invalid argument; the message names the field.
    """

    def __init__(
        self,
        bits: int,
        num_channels: int | None = None,
        *,
        per_sample: bool = False,
        field: str = "downstream.weight_bits",
    ) -> None:
        bits, num_channels = validate_common(bits, False, num_channels, field)
        check(isinstance(per_sample, bool), "per_sample", per_sample, "true or false")
        check(not (per_sample and num_channels is not None), "per_sample", per_sample,
              "false when num_channels is set (per-channel steps lie along dim 0, the batch dimension of activations)")
        super().__init__(num_channels)
        self.bits = bits
        self.per_sample = per_sample
        self.qp = 2**bits - 1
        shape = () if num_channels is None else (num_channels,)
        # Placeholders until the first forward overwrites them in place.
        self.log_step = nn.Parameter(torch.zeros(shape))
        self.offset = nn.Parameter(torch.zeros(shape))

    @property
    def step(self) -> Tensor:
        """The step, ``exp(log_step)``."""
        return self.log_step.exp()

    def grad_scale(self, x: Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(N * Qp)`` for an input shaped like ``x``."""
        return 1.0 / math.sqrt(elements_per_step(x, self.per_sample, self.num_channels) * self.qp)

    def _initialize(self, x: Tensor) -> None:
        rows = as_rows(x.to(self._stats_dtype(x)), self.num_channels)
        mean, std = rows.mean(dim=1), rows.std(dim=1, correction=0)
        # [max(min, mean - 3 std), min(max, mean + 3 std)], EWGS's start. The data's own
        # min/max (LSQ+'s first rule) lets one outlier take most of four levels; LSQ+'s
        # symmetric 3-std rule reaches past the data where a channel is small (a depthwise
        # 3x3 has 9 weights), and measured on MobileNet-V1 it trained to 45.4 at W2A2 where
        # this start reached 52.1 (benchmarks/RESULTS.md).
        low = torch.maximum(rows.amin(dim=1), mean - STDS * std)
        high = torch.minimum(rows.amax(dim=1), mean + STDS * std)
        if self.per_sample:
            # 3 std alone clips 8-bit activations hard (W2A8 stayed at chance): at least the
            # MSE-optimal grid's range, EWGS's rule for its activations. A ReLU output (min 0)
            # keeps zero a level either way.
            mse_low, mse_high = mse_interval(rows, self.bits, symmetric=False)
            low, high = torch.minimum(low, mse_low), torch.maximum(high, mse_high)
        # An all-zero channel's step of 0 starts at the smallest one instead: its values stay 0.
        self.log_step.copy_(((high - low) / self.qp).clamp(min=MIN_STEP).log().reshape(self.log_step.shape))
        self.offset.copy_(low.reshape(self.offset.shape))

    def forward(self, x: Tensor) -> Tensor:
        # Autocast off: the step, the offset and their statistics stay float32.
        with full_precision(x):
            self._check_channels(x)
            self._maybe_initialize(x)
            dtype = compute_dtype(x, self.log_step)
            scale = self.grad_scale(x)
            s = self._broadcast(floor_ste(grad_scale(self.step, scale).to(dtype), MIN_STEP), x)
            beta = self._broadcast(grad_scale(self.offset, scale).to(dtype), x)
            u = clamp_inclusive((x.to(dtype) - beta) / s, 0.0, self.qp)
            return (ste(torch.round(u), u) * s + beta).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, num_channels={self.num_channels}, per_sample={self.per_sample}"

"""Learnable fake quantizers for quantization-aware training: LSQ and EWGS (R2LOSS spec 3.2).

PTQ (:mod:`r2sweep.core.quant.fake`) fixes the quantization grid from the trained
network; QAT fine-tunes the network *through* the quantizer so that weights and
activations adapt to the grid, and the grid itself is learned. Which of the two a
trial runs is exactly where R2's range restriction should pay off differently, so
both QAT methods the paper relies on are here:

* :class:`LsqQuantizer` -- LSQ (Esser et al. 2020): a learnable step ``s`` on the
  integer grid ``[-Qn, Qp]``, ``x_hat = round(clamp(x / s, -Qn, Qp)) * s``, with a
  straight-through estimator (STE) on ``round`` and the step's gradient scaled by
  ``1 / sqrt(N * Qp)`` so that its updates are on the scale of the weights' own.
* :class:`EwgsQuantizer` -- EWGS (Lee et al. 2021): a learnable interval ``[l, u]``
  with ``L = 2^b`` evenly spaced levels; the STE's gradient is scaled element-wise
  by ``1 + delta * sign(g) * (x_n - x_q)``, which nudges each value towards the
  level that lowers the loss instead of treating every value in a bin alike.

Both are drop-in ``nn.Module`` s: ``forward(x)`` returns a tensor of ``x``'s shape
and dtype, on the quantized grid, in ``x``'s own units (de-normalized). Their
parameters are initialized from the first tensor they see (lazily, in place, so an
optimizer built before that first call keeps working); an ``initialized`` buffer
records it, so a quantizer loaded from a ``state_dict`` keeps the learned values.
"""

from __future__ import annotations

import math
from typing import Any

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
    sibling,
    ste,
    validate_common,
)
from r2sweep.core.validate import check, is_number

__all__ = ["DEFAULT_EWGS_DELTA", "LsqQuantizer", "EwgsQuantizer"]

#: Fixed EWGS gradient-scaling factor. The paper sets delta per layer from a
#: Hessian-trace estimate, small values of the order of 1e-3 (recalled from its
#: plots, not re-derived here); R2LOSS 3.2 accepts a fixed, configurable delta as
#: a first version. Since ``|x_n - x_q| <= 1 / (2 (L-1))``, this changes each
#: gradient by at most ~0.02% at 2 bits: a conservative default, meant to be swept.
DEFAULT_EWGS_DELTA = 1e-3

class LsqQuantizer(LazyQuantizer):
    """LSQ fake quantizer: ``round(clamp(x / s, -Qn, Qp)) * s`` with a learnable step ``s``.

    Grid: signed ``Qn = 2^(b-1), Qp = 2^(b-1) - 1``; unsigned ``Qn = 0, Qp = 2^b - 1``
    (for non-negative data such as activations after ReLU). The gradient w.r.t.
    ``x`` is the STE: 1 where ``-Qn <= x/s <= Qp``, 0 outside. The step's gradient
    is, per element, ``-x/s + round(x/s)`` inside, ``-Qn`` / ``Qp`` when clipped low
    / high, all times ``g = 1 / sqrt(N * Qp)``.

    ``N``, the number of values one step serves: for weights (``per_sample=False``)
    the elements per step, ``numel`` or ``numel / num_channels``; for activations
    (``per_sample=True``) the features of one sample, ``x[0].numel()``, because the
    batch dimension repeats the same features rather than adding new ones (the
    paper's rule; it also keeps ``g`` independent of the batch size).

    Initialization, from the first tensor: ``s = 2 * mean|x| / sqrt(Qp)`` (per
    channel: each channel's own mean). An all-zero channel gets ``s = 0``, used as
    a tiny positive step: its values stay exactly 0.

    1-bit signed is special: ``Qp = 0`` would leave the levels ``{-s, 0}``. It uses
    the two levels ``{-s, +s}`` instead, ``s * sign(x)`` with ``sign(0) = +1`` (as
    :func:`r2sweep.core.quant.fake.binarize`): STE for ``x`` where ``|x/s| <= 1``, step
    gradient ``-x/s + sign(x)`` inside and ``sign(x)`` outside (LSQ's formula with
    ``round`` replaced by ``sign``), scaled by ``1 / sqrt(N)``; initialized at
    ``s = mean|x|``, the least-squares step of ``s * sign(x)``.

    Args:
        bits: bit width, 1 to 8.
        signed: signed grid; False for non-negative data (an unsigned grid from 0).
        num_channels: one step per slice along dim 0 (per output channel of a
            weight); None for one step for the whole tensor.
        per_sample: ``x``'s dim 0 is a batch (activations): ``N = x[0].numel()``.
            Not combinable with ``num_channels``, whose steps are along dim 0.
        field: the config field ``bits`` came from, named in errors
            (``"downstream.weight_bits"`` or ``"downstream.act_bits"``); a bad
            ``signed`` names ``symmetric`` / ``act_signed`` of the same section.

    Raises:
        ConfigError: an invalid argument; the message names the field.
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        num_channels: int | None = None,
        *,
        per_sample: bool = False,
        field: str = "downstream.weight_bits",
        mse_start: bool = False,
    ) -> None:
        bits, num_channels = validate_common(bits, signed, num_channels, field)
        check(isinstance(per_sample, bool), "per_sample", per_sample, "true or false")
        check(
            not (per_sample and num_channels is not None),
            "per_sample",
            per_sample,
            "false when num_channels is set (per-channel steps lie along dim 0, the batch dimension of activations)",
        )
        super().__init__(num_channels)
        self.bits = bits
        self.signed = signed
        self.per_sample = per_sample
        self.binary = bits == 1 and signed
        self.mse_start = mse_start
        if signed:
            self.qn, self.qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
        else:
            self.qn, self.qp = 0, 2**bits - 1
        # 1.0 is a placeholder until the first forward overwrites it in place.
        shape = () if num_channels is None else (num_channels,)
        self.step = nn.Parameter(torch.ones(shape))

    def grad_scale(self, x: Tensor) -> float:
        """The factor ``g`` on the step's gradient for an input shaped like ``x``."""
        n = elements_per_step(x, self.per_sample, self.num_channels)
        return 1.0 / math.sqrt(n * (1 if self.binary else self.qp))

    def _initialize(self, x: Tensor) -> None:
        rows = as_rows(x.to(self._stats_dtype(x)), self.num_channels)
        if self.mse_start and not self.binary:
            # PTQ's grid: the MSE search's upper end is Qp steps on either grid (signed
            # symmetric, or affine from zero for non-negative data).
            step = mse_interval(rows, self.bits, self.signed)[1] / self.qp
        else:
            mean_abs = rows.abs().mean(dim=1)
            step = mean_abs if self.binary else 2.0 * mean_abs / math.sqrt(self.qp)
        self.step.copy_(step.reshape(self.step.shape))

    def forward(self, x: Tensor) -> Tensor:
        # Autocast off: the step and its initial statistics stay float32 under a bf16/fp16 forward.
        with full_precision(x):
            return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        self._maybe_initialize(x)
        dtype = compute_dtype(x, self.step)
        v = x.to(dtype)
        s = grad_scale(self.step, self.grad_scale(x)).to(dtype)
        s = self._broadcast(floor_ste(s, MIN_STEP), x)
        if self.binary:
            u = clamp_inclusive(v / s, -1.0, 1.0)
            # u >= 0 exactly when x >= 0 (s > 0): sign(0) = +1, never a third level.
            q = ste((u >= 0).to(dtype) * 2 - 1, u)
        else:
            u = clamp_inclusive(v / s, -self.qn, self.qp)
            q = ste(torch.round(u), u)
        return (q * s).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, signed={self.signed}, num_channels={self.num_channels}, per_sample={self.per_sample}"
        )


# --- EWGS ---------------------------------------------------------------------------


class _EwgsRound(torch.autograd.Function):
    """``x_q = round(x_n * (L-1)) / (L-1)``; backward ``g * (1 + delta * sign(g) * (x_n - x_q))``."""

    @staticmethod
    def forward(ctx: Any, x_n: Tensor, steps: int, delta: float) -> Tensor:
        x_q = torch.round(x_n * steps) / steps
        ctx.delta = delta
        ctx.save_for_backward(x_n - x_q)
        return x_q

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.delta == 0:
            return grad, None, None
        (residual,) = ctx.saved_tensors
        return grad * (1 + ctx.delta * torch.sign(grad) * residual), None, None


class EwgsQuantizer(LazyQuantizer):
    """EWGS fake quantizer: ``L = 2^b`` even levels on a learnable interval ``[l, u]``.

    Forward: ``x_n = clamp((x - l) / (u - l), 0, 1)``, ``x_q = round(x_n (L-1)) / (L-1)``,
    output ``l + x_q (u - l)`` (back in ``x``'s units). Backward through the
    rounding: ``g_xn = g_xq * (1 + delta * sign(g_xq) * (x_n - x_q))``; ``delta = 0``
    is the plain STE. ``l`` and ``u`` get their gradients by ordinary autograd
    through the normalization, clamp and de-normalization. The width ``u - l`` is
    used as at least ``1e-8`` so that it never divides by zero.

    Initialization, from the first tensor (per channel if ``num_channels``):

    * signed, 2-8 bits: ``[mean - 3 std, mean + 3 std]`` intersected with
      ``[min, max]``. 3 std clips the rare outliers of a heavy-tailed
      (unregularized) layer; the min/max bound keeps the levels inside the data
      when R2 has already restricted the range (a uniform-like layer's 3 std
      reaches past its max and would waste levels).
    * signed, 1 bit: ``[-mean|x|, +mean|x|]``, so the two levels are the
      least-squares ``s * sign(x)`` of PTQ and LSQ.
    * unsigned (non-negative data, e.g. activations after ReLU): ``l = 0``, kept
      fixed (``lower`` does not require grad and is detached in forward) so that
      zero, the most common activation, stays exactly representable;
      ``u = min(max, mean + 3 std)`` for the same reason as above.
    * ``cover_mse_range`` (activations): the interval widened, where it is
      narrower, to the range of the MSE-optimal grid of the same bits (the PTQ
      range search, :func:`r2sweep.core.quant.fake.weight_qparams`, on at most
      65536 of the values). 3 std suits 2 bits but clips 8-bit activations far
      too tightly: on a MobileNet-V1 (benchmarks/RESULTS.md, ``qat_recipe.py``)
      W8A8 started at 41.9% instead of 83.2%, and W2A2 trained to 44.4 instead
      of 50.3. The MSE range alone is worse at 2-bit activations (too tight to
      train from), hence the wider of the two.

    Args:
        bits: bit width, 1 to 8.
        signed: a learnable ``l``; False for non-negative data (``l = 0`` fixed).
        delta: the fixed EWGS scaling factor, >= 0 (default
            :data:`DEFAULT_EWGS_DELTA`).
        num_channels: one interval per slice along dim 0 (per output channel of a
            weight); None for one interval for the whole tensor.
        field: the config field ``bits`` came from, named in errors; ``delta``
            errors name the ``delta`` field of the same section.
        cover_mse_range: initialize to at least the MSE-optimal grid's range
            (see above); the QAT recipe sets it for activations.

    Raises:
        ConfigError: an invalid argument; the message names the field
            (``downstream.delta`` for ``delta`` with the default ``field``).
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        delta: float = DEFAULT_EWGS_DELTA,
        num_channels: int | None = None,
        *,
        field: str = "downstream.weight_bits",
        cover_mse_range: bool = False,
    ) -> None:
        bits, num_channels = validate_common(bits, signed, num_channels, field)
        check(isinstance(cover_mse_range, bool), "cover_mse_range", cover_mse_range, "true or false")
        delta_field = sibling(field, "delta")
        check(is_number(delta) and delta >= 0, delta_field, delta, "a finite number >= 0 (0 = plain STE)")
        super().__init__(num_channels)
        self.bits = bits
        self.signed = signed
        self.delta = float(delta)
        self.levels = 2**bits
        self.cover_mse_range = cover_mse_range
        shape = () if num_channels is None else (num_channels,)
        # Placeholders until the first forward overwrites them in place.
        self.lower = nn.Parameter(torch.zeros(shape), requires_grad=signed)
        self.upper = nn.Parameter(torch.ones(shape))

    def _initialize(self, x: Tensor) -> None:
        rows = as_rows(x.to(self._stats_dtype(x)), self.num_channels)
        if self.signed and self.bits == 1:
            half = rows.abs().mean(dim=1)
            lower, upper = -half, half
        else:
            mean = rows.mean(dim=1)
            std = rows.std(dim=1, correction=0)
            upper = torch.minimum(rows.amax(dim=1), mean + 3 * std)
            if self.signed:
                lower = torch.maximum(rows.amin(dim=1), mean - 3 * std)
            else:
                lower = torch.zeros_like(upper)
            if self.cover_mse_range:
                # The MSE grid of EWGS's own levels: symmetric when signed, from 0 when not.
                mse_lower, mse_upper = mse_interval(rows, self.bits, self.signed)
                lower, upper = torch.minimum(lower, mse_lower), torch.maximum(upper, mse_upper)
        self.lower.copy_(lower.reshape(self.lower.shape))
        self.upper.copy_(upper.reshape(self.upper.shape))

    def forward(self, x: Tensor) -> Tensor:
        # Autocast off: the interval (and the MSE range search of its init) stays float32.
        with full_precision(x):
            return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        self._maybe_initialize(x)
        dtype = compute_dtype(x, self.upper)
        v = x.to(dtype)
        lower = self.lower if self.signed else self.lower.detach()
        lower = self._broadcast(lower.to(dtype), x)
        upper = self._broadcast(self.upper.to(dtype), x)
        width = floor_ste(upper - lower, MIN_STEP)
        x_n = torch.clamp((v - lower) / width, 0.0, 1.0)
        x_q = _EwgsRound.apply(x_n, self.levels - 1, self.delta)
        return (lower + x_q * width).to(x.dtype)

    def extra_repr(self) -> str:
        cover = ", cover_mse_range=True" if self.cover_mse_range else ""
        return f"bits={self.bits}, signed={self.signed}, delta={self.delta}, num_channels={self.num_channels}{cover}"

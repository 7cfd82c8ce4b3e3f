"""Uniform affine fake quantization of weights and activations (R2LOSS spec).

A tensor ``x`` is mapped to integers ``q = clamp(round(x / s) + z, qmin, qmax)``
and back to floats ``x_hat = (q - z) * s``. Fake quantization keeps the float
dtype, so a quantized network runs on the ordinary float kernels and the effect
of 1-8-bit weights/activations on accuracy can be measured directly.

1-bit symmetric quantization is the special case ``x_hat = s * sign(x)`` with
two levels ``{-s, +s}``: the signed integer grid ``[-1, 0]`` would waste one of
its two levels on zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.validate import require_int

__all__ = [
    "GRANULARITIES",
    "RANGES",
    "OBSERVERS",
    "QuantSpec",
    "qrange",
    "weight_qparams",
    "fake_quantize",
    "binarize",
    "quantize_weight",
    "ActivationQuantizer",
]

GRANULARITIES = ("tensor", "channel")
RANGES = ("minmax", "mse")
OBSERVERS = ("minmax", "percentile")

#: Clipping ratios the MSE range search tries, in (0, 1].
MSE_GRID_SIZE = 100
# Elements processed at once by the MSE search (candidates x weights): bounds its
# memory at ~64 MiB of float32 whatever the layer size.
_MSE_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class QuantSpec:
    """How a weight tensor is quantized.

    Attributes:
        bits: bit width, 1 to 8.
        symmetric: signed grid around zero (``z = 0``) rather than an affine
            ``[min, max]`` grid.
        granularity: ``"tensor"`` (one scale per tensor) or ``"channel"`` (one
            per output channel, dim 0).
        range: ``"minmax"`` (the full range) or ``"mse"`` (the clipped range with
            the least squared error).

    Raises:
        ConfigError: a field is invalid; the message names ``downstream.*``.
    """

    bits: int
    symmetric: bool = True
    granularity: str = "tensor"
    range: str = "minmax"

    def __post_init__(self) -> None:
        require_int("downstream.weight_bits", self.bits, 1, maximum=8)
        if not isinstance(self.symmetric, bool):
            raise ConfigError("downstream.symmetric", self.symmetric, "true or false")
        if self.granularity not in GRANULARITIES:
            raise ConfigError("downstream.granularity", self.granularity, f"choose one of {list(GRANULARITIES)}")
        if self.range not in RANGES:
            raise ConfigError("downstream.range", self.range, f"choose one of {list(RANGES)}")

    @property
    def binary(self) -> bool:
        """Whether this is the two-level ``s * sign(x)`` quantizer."""
        return self.bits == 1 and self.symmetric


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)``: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.

    Raises:
        ConfigError: ``bits`` is not an integer from 1 to 8.
    """
    require_int("downstream.weight_bits", bits, 1, maximum=8)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _safe_scale(scale: Tensor) -> Tensor:
    # An all-zero tensor (or channel) has a zero range; any positive scale maps
    # it to q = z and back to exactly zero, and 1 avoids dividing by zero.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; ``scale``/``zero_point`` broadcast against ``x``."""
    scale = _safe_scale(torch.as_tensor(scale, dtype=x.dtype, device=x.device))
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def binarize(x: Tensor, scale: Tensor) -> Tensor:
    """``scale * sign(x)`` with ``sign(0) = +1``: the two levels ``{-s, +s}`` of 1-bit symmetric."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    # torch.sign(0) is 0, which would be a third level.
    return torch.where(x >= 0, scale, -scale)


# --- weight ranges ----------------------------------------------------------------


def _rows(w: Tensor, granularity: str) -> Tensor:
    """``w`` as ``(groups, elements)``: one row per channel, or a single row."""
    if granularity == "channel" and w.dim() >= 1:
        return w.reshape(w.shape[0], -1)
    return w.reshape(1, -1)


def _broadcast(values: Tensor, w: Tensor, granularity: str) -> Tensor:
    """Per-row values shaped to broadcast against ``w``: 0-d, or ``(C, 1, 1, ...)``."""
    if granularity == "channel" and w.dim() >= 1:
        return values.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
    return values.reshape(())


def _uniform_params(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the grid covering ``[lo, hi]`` (``lo <= 0 <= hi``), elementwise."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / (qmax - qmin)
    zero_point = torch.clamp(torch.round(-lo / _safe_scale(scale)), qmin, qmax)
    return scale, zero_point


def _row_ranges(rows: Tensor) -> tuple[Tensor, Tensor]:
    # The range always contains 0 so that zero (padding, pruned weights) is exact.
    lo = rows.amin(dim=1).clamp(max=0)
    hi = rows.amax(dim=1).clamp(min=0)
    return lo, hi


def _mse_search(
    rows: Tensor,
    params_at: Callable[[Tensor], tuple[Tensor, Tensor]],
    quantize: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Per row, the candidate ``(scale, zero_point)`` with the least squared error.

    Args:
        rows: ``(G, N)`` values.
        params_at: maps clipping ratios ``(R,)`` to ``(R, G)`` scales and zero points.
        quantize: ``(rows (1, G, N), scale (R, G, 1), zp (R, G, 1)) -> (R, G, N)``.
    """
    ratios = torch.linspace(1.0 / MSE_GRID_SIZE, 1.0, MSE_GRID_SIZE, dtype=rows.dtype, device=rows.device)
    scales, zero_points = params_at(ratios)
    chunk = max(1, _MSE_CHUNK_ELEMENTS // max(1, rows.numel()))
    errors = []
    for start in range(0, MSE_GRID_SIZE, chunk):
        s = scales[start : start + chunk, :, None]
        z = zero_points[start : start + chunk, :, None]
        errors.append((quantize(rows[None], s, z) - rows[None]).pow(2).sum(dim=2))
    best = torch.cat(errors).argmin(dim=0)  # (G,); ties pick the smallest ratio
    index = torch.arange(rows.shape[0], device=rows.device)
    return scales[best, index], zero_points[best, index]


def _binary_scale(rows: Tensor, range_: str) -> Tensor:
    if range_ == "mse":
        # argmin_s ||x - s sign(x)||^2 = mean|x| in closed form.
        return rows.abs().mean(dim=1)
    return rows.abs().amax(dim=1)


def weight_qparams(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ``w`` under ``spec``, shaped to broadcast against ``w``.

    For ``spec.binary`` the scale is the ``s`` of ``s * sign(w)`` and the zero point 0.

    Returns:
        ``(scale, zero_point)``: 0-d per tensor, ``(C, 1, ..., 1)`` per channel.
    """
    rows = _rows(w.detach(), spec.granularity)
    if spec.binary:
        scale = _binary_scale(rows, spec.range)
        zero_point = torch.zeros_like(scale)
    else:
        lo, hi = _row_ranges(rows)
        if spec.range == "minmax":
            scale, zero_point = _uniform_params(lo, hi, spec.bits, spec.symmetric)
        else:
            qmin, qmax = qrange(spec.bits, spec.symmetric)

            def params_at(ratios: Tensor) -> tuple[Tensor, Tensor]:
                return _uniform_params(ratios[:, None] * lo, ratios[:, None] * hi, spec.bits, spec.symmetric)

            def quantize(x: Tensor, s: Tensor, z: Tensor) -> Tensor:
                return fake_quantize(x, s, z, qmin, qmax)

            scale, zero_point = _mse_search(rows, params_at, quantize)
    return _broadcast(scale, w, spec.granularity), _broadcast(zero_point, w, spec.granularity)


def quantize_weight(w: Tensor, spec: QuantSpec) -> Tensor:
    """The fake-quantized copy of ``w`` (``w`` itself is not modified)."""
    scale, zero_point = weight_qparams(w, spec)
    if spec.binary:
        return binarize(w, scale)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    return fake_quantize(w, scale, zero_point, qmin, qmax)


# --- activations ------------------------------------------------------------------


class ActivationQuantizer(nn.Module):
    """Fake-quantizes activations with a range observed on calibration batches.

    Set ``calibrating = True`` and run a few batches: the module observes their
    range and passes them through unchanged. Once it has seen at least one batch
    and ``calibrating`` is False, it fake-quantizes; before any calibration it
    passes through.

    Args:
        bits: bit width, 1 to 8.
        signed: a symmetric signed grid; False for non-negative activations
            (after ReLU): an unsigned grid over ``[0, max]``.
        observer: ``"minmax"`` (running min/max over all calibration batches) or
            ``"percentile"`` (mean over batches of the ``percentile``-th
            percentile of ``|x|``; ignores rare outliers).
        percentile: in (0, 100], used by the ``"percentile"`` observer.

    Raises:
        ConfigError: an invalid argument; the message names ``downstream.*``.
    """

    def __init__(self, bits: int, signed: bool = True, observer: str = "minmax", percentile: float = 99.99) -> None:
        super().__init__()
        self.bits = require_int("downstream.act_bits", bits, 1, maximum=8)
        if not isinstance(signed, bool):
            raise ConfigError("downstream.act_signed", signed, "true or false")
        if observer not in OBSERVERS:
            raise ConfigError("downstream.act_observer", observer, f"choose one of {list(OBSERVERS)}")
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ConfigError("downstream.act_percentile", percentile, "a number in (0, 100]")
        self.signed = signed
        self.observer = observer
        self.percentile = float(percentile)
        self.calibrating = False
        # Buffers, so the calibrated range is saved with the model's state.
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))
        # Mirrors num_batches > 0 as a plain attribute: forward must not read a buffer's value to
        # choose its path, or torch.export (the packed file's graph) cannot trace it.
        self._calibrated = False

    @property
    def calibrated(self) -> bool:
        return self._calibrated

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._calibrated = int(self.num_batches) > 0

    def reset(self) -> None:
        """Forget the observed range."""
        self.min_val.zero_()
        self.max_val.zero_()
        self.num_batches.zero_()
        self._calibrated = False

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold one batch into the observed range."""
        x = x.detach().float()
        if self.observer == "minmax":
            lo, hi = x.min(), x.max()
            first = not self.calibrated
            self.min_val.copy_(lo if first else torch.minimum(self.min_val, lo))
            self.max_val.copy_(hi if first else torch.maximum(self.max_val, hi))
        else:
            flat = x.abs().flatten()
            # kthvalue rather than torch.quantile, which refuses > 16M elements.
            k = max(1, min(flat.numel(), int(round(self.percentile / 100.0 * flat.numel()))))
            bound = flat.kthvalue(k).values
            n = int(self.num_batches)
            self.max_val.mul_(n).add_(bound).div_(n + 1)
            self.min_val.copy_(-self.max_val)
        self.num_batches += 1
        self._calibrated = True

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point (0-d) of the calibrated range."""
        if self.signed:
            bound = torch.maximum(self.min_val.abs(), self.max_val.abs())
            if self.bits == 1:
                return bound, torch.zeros_like(bound)
            return _uniform_params(-bound, bound, self.bits, True)
        # Unsigned: the grid starts at 0 (z = 0), so all of it covers [0, max].
        return _uniform_params(torch.zeros_like(self.max_val), self.max_val.clamp(min=0), self.bits, False)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not self.calibrated:
            return x
        scale, zero_point = self.qparams()
        if self.signed and self.bits == 1:
            return binarize(x, scale.to(x.dtype))
        qmin, qmax = qrange(self.bits, self.signed)
        return fake_quantize(x, scale, zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, observer={self.observer!r}"

"""What LSQ and EWGS share: lazy initialization from the first tensor, exact autograd helpers, checks.

A learned quantizer's parameters (LSQ's step, EWGS's interval) are set from the
first tensor it sees, in place, so an optimizer built before that call keeps
working; an ``initialized`` buffer records it, so a quantizer loaded from a
``state_dict`` keeps its learned values (:class:`LazyQuantizer`). The autograd
helpers return exactly the intended value (see their comments).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.quant.fake import QuantSpec, qrange, weight_qparams
from r2sweep.core.validate import require_int

__all__ = ["LazyQuantizer", "MIN_STEP", "MSE_SAMPLE", "elements_per_step", "mse_interval", "ste", "grad_scale",
           "floor_ste", "compute_dtype", "as_rows", "sibling", "validate_common"]


# Smallest step (LSQ) or interval width (EWGS) used in the forward pass: the
# learned value may be driven to (or initialized at) zero, and dividing by it
# would give inf/NaN. Far below any step a 1-8-bit grid of real weights uses.
MIN_STEP = 1e-8

# Values the MSE range search of ``cover_mse_range`` looks at, at most (a random
# subsample, fixed seed): a 512-image calibration batch of activations has millions.
MSE_SAMPLE = 1 << 16


# --- autograd helpers ---------------------------------------------------------------
# Each returns exactly the intended value: the textbook ``v + (f(v) - v).detach()``
# is off by rounding error, which would break "at most 2^b levels" and exact grids.


def ste(value: Tensor, through: Tensor) -> Tensor:
    """``value`` forward; backward, the gradient of ``through`` (identity STE)."""
    return value.detach() + (through - through.detach())


def grad_scale(p: Tensor, factor: float) -> Tensor:
    """``p`` forward; its gradient times ``factor`` backward (LSQ's gradient scale).

    The paper's ``(p - p*g).detach() + p*g``, rearranged so the value is ``p``
    exactly: ``p.detach() + (p*g - (p*g).detach())`` adds an exact zero.
    """
    if factor == 1.0:
        return p
    scaled = p * factor
    return p.detach() + (scaled - scaled.detach())


def clamp_inclusive(v: Tensor, low: float, high: float) -> Tensor:
    """``clamp(v, low, high)`` whose gradient passes at the bounds too (``low <= v <= high``).

    torch's clamp passes it strictly inside only, so a value exactly on the grid's
    end (a ReLU output of exactly 0 on an unsigned grid) would get none, against
    LSQ's rule; torch's own learnable fake-quantize kernel passes it too
    (tests/test_quant_second_opinion.py).
    """
    inside = (v >= low) & (v <= high)
    return torch.where(inside, v, v.clamp(low, high).detach())


def floor_ste(v: Tensor, minimum: float) -> Tensor:
    """``max(v, minimum)`` forward, identity gradient backward.

    A plain clamp would zero the gradient below ``minimum``, so a step or width
    pushed there could never recover. The value is the clamp exactly: the textbook
    ``v + (clamp(v) - v).detach()`` cancels to 0 in float32 once ``v`` is far below
    ``minimum`` (-3.4 + (1e-8 + 3.4) == 0), and a zero step divides to NaN. Seen
    when LSQ's 2-bit activation steps overshoot below zero on MobileNet-V1.
    """
    return ste(v.clamp(min=minimum), v)


def compute_dtype(x: Tensor, p: Tensor) -> torch.dtype:
    # Half-precision inputs (autocast) are quantized in the float32 of the
    # parameters: a 1e-3 step divides badly in float16. Float64 stays float64.
    return torch.promote_types(x.dtype, p.dtype)


def as_rows(x: Tensor, channels: int | None) -> Tensor:
    """``x`` as ``(channels, elements)``, or a single row."""
    if channels is None:
        return x.reshape(1, -1)
    return x.reshape(channels, -1)


def mse_interval(rows: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per row of ``rows`` ``(G, N)``, the ends ``[l, u]`` of the MSE-optimal uniform grid at ``bits``.

    The PTQ range search (:func:`r2sweep.core.quant.fake.weight_qparams`) on at most
    :data:`MSE_SAMPLE` values per call: symmetric, ``-2^(b-1) s .. (2^(b-1) - 1) s``;
    else affine, ``(0 - z) s .. (2^b - 1 - z) s`` (``z = 0`` for non-negative data).
    """
    if rows.shape[1] > MSE_SAMPLE:  # a calibration batch of activations: a fixed subsample is as good and fast
        generator = torch.Generator().manual_seed(0)
        rows = rows[:, torch.randperm(rows.shape[1], generator=generator)[:MSE_SAMPLE].to(rows.device)]
    scale, zero_point = weight_qparams(rows, QuantSpec(bits, symmetric=symmetric, granularity="channel", range="mse"))
    scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
    qmin, qmax = qrange(bits, symmetric)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def elements_per_step(x: Tensor, per_sample: bool, num_channels: int | None) -> int:
    """LSQ's ``N``, the values one step serves: one sample's features for activations
    (the batch repeats them rather than adding new ones), else the elements per channel."""
    if per_sample:
        return max(1, x[0].numel()) if x.dim() > 0 and x.shape[0] > 0 else 1
    return max(1, x.numel() // (num_channels or 1))


def sibling(field: str, name: str) -> str:
    """The field ``name`` in the same section as ``field``: ``("downstream[0].act_bits", "delta")``
    gives ``"downstream[0].delta"``, so errors name the entry the caller validated."""
    section, dot, _ = field.rpartition(".")
    return f"{section}{dot}{name}"


def validate_common(bits: Any, signed: Any, num_channels: Any, field: str) -> tuple[int, int | None]:
    bits = require_int(field, bits, 1, maximum=8)
    if not isinstance(signed, bool):
        signed_name = "act_signed" if field.endswith("act_bits") else "symmetric"
        raise ConfigError(sibling(field, signed_name), signed, "true or false")
    if num_channels is not None:
        num_channels = require_int("num_channels", num_channels, 1)
    return bits, num_channels


class LazyQuantizer(nn.Module):
    """Base: parameters initialized from the first tensor seen, recorded in a buffer."""

    def __init__(self, num_channels: int | None) -> None:
        super().__init__()
        self.num_channels = num_channels
        # A buffer, so the flag travels with state_dict: a loaded quantizer must
        # not overwrite its learned parameters from the next batch.
        self.register_buffer("initialized", torch.tensor(False))
        # Python-side cache of the buffer: reading a CUDA buffer every forward
        # would synchronize with the device. Cleared whenever a state_dict loads.
        self._ready = False
        self.register_load_state_dict_post_hook(forget_ready)

    def reset(self) -> None:
        """Re-initialize from the next tensor seen."""
        self.initialized.fill_(False)
        self._ready = False

    def _maybe_initialize(self, x: Tensor) -> None:
        if self._ready:
            return
        if not bool(self.initialized):
            with torch.no_grad():
                self._initialize(x.detach())
            self.initialized.fill_(True)
        self._ready = True

    def _initialize(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_channels(self, x: Tensor) -> None:
        if self.num_channels is not None and (x.dim() == 0 or x.shape[0] != self.num_channels):
            raise ValueError(
                f"{type(self).__name__} has {self.num_channels} channels along dim 0, got shape {tuple(x.shape)}"
            )

    def _broadcast(self, p: Tensor, x: Tensor) -> Tensor:
        """Per-channel ``(C,)`` as ``(C, 1, ..., 1)`` against ``x``; scalars as they are."""
        if self.num_channels is None:
            return p
        return p.reshape((self.num_channels,) + (1,) * (x.dim() - 1))

    def _stats_dtype(self, x: Tensor) -> torch.dtype:
        # Initial statistics in at least float32, whatever the input precision.
        return torch.promote_types(x.dtype, torch.float32)


def forget_ready(module: nn.Module, incompatible_keys: Any) -> None:
    module._ready = False  # type: ignore[assignment]


# --- LSQ ----------------------------------------------------------------------------

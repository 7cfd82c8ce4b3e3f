"""Soft-Min-Max R2 (R2LOSS.md 2.3): a differentiable range with a learnable temperature."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from r2sweep.core.errors import ConfigError
from r2sweep.core.losses import functional as F
from r2sweep.core.losses import native
from r2sweep.core.losses.base import R2Loss, register_r2_loss

__all__ = ["SoftMinMaxR2"]


def _inverse_softplus(x: Tensor) -> Tensor:
    # softplus(y) = x  <=>  y = x + log(-expm1(-x)), stable for small and large x.
    return x + torch.log(-torch.expm1(-x))


@register_r2_loss("softminmax")
class SoftMinMaxR2(R2Loss):
    """``R(W) = smax(W) - smin(W) + eta * exp(-alpha)`` with a learnable alpha per layer.

    alpha stays positive through ``alpha = softplus(rho)``; ``rho`` is the parameter.
    This kind keeps two weight-sized buffers per layer, and three the size of the
    largest layer, between steps (see
    :class:`~r2sweep.core.losses.functional.SoftMinMaxBuffers`).

    Args:
        alpha_init: alpha at switch-on in units of ``1/max|W|`` of the layer:
            ``alpha * max|W| = alpha_init`` (default 5), so one number suits every layer.
        eta: weight of the ``exp(-alpha)`` term (default 1).
    """

    own_options = ("alpha_init", "eta")

    def __init__(
        self, model: nn.Module, strength: float, *, alpha_init: float = 5.0, eta: float = 1.0, **common
    ) -> None:
        super().__init__(model, strength, **common)
        for name, value in (("alpha_init", alpha_init), ("eta", eta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"r2.{name}", value, "a finite number")
        if alpha_init <= 0:
            raise ConfigError("r2.alpha_init", alpha_init, "a number > 0 (alpha * max|W| at switch-on)")
        if eta < 0:
            raise ConfigError("r2.eta", eta, "a number >= 0")
        self.alpha_init = float(alpha_init)
        self.eta = float(eta)
        self.raw_alphas = nn.ParameterList(
            nn.Parameter(w.new_zeros(self._scalar_shape(w)).detach()) for w in self._weights
        )
        # Saved buffers per layer; the backward's temporaries shared by all layers.
        shared_scratch: dict[str, Tensor] = {}
        self._buffers_per_layer = [F.SoftMinMaxBuffers(scratch=shared_scratch) for _ in self._weights]

    def alpha(self, index: int) -> Tensor:
        return softplus(self.raw_alphas[index])

    def reset_parameters(self) -> None:
        for weight, raw in zip(self._weights, self.raw_alphas):
            rows = weight.reshape(weight.shape[0], -1) if self.per_channel else weight.reshape(1, -1)
            max_abs = rows.abs().amax(1).clamp_min(torch.finfo(weight.dtype).tiny)
            raw.copy_(_inverse_softplus(self.alpha_init / max_abs).reshape(raw.shape))

    def layer_penalty(self, index: int, weight: Tensor) -> Tensor:
        return F.soft_min_max(
            weight,
            self.alpha(index),
            self.eta,
            granularity=self.granularity,
            buffers=self._buffers_per_layer[index],
        )

    def notes(self, device: torch.device) -> list[str]:
        if device.type == "cpu" and native.softminmax_library() is None:
            return [f"Soft-Min-Max runs as {native.status()}: the same values, a slower training step"]
        return []

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha_init={self.alpha_init}, eta={self.eta}"

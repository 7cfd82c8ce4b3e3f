"""Margin R2 (R2LOSS.md 2.2): a learnable margin per layer, weights outside it penalized."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.losses import functional as F
from r2sweep.core.losses.base import R2Loss, register_r2_loss

__all__ = ["MarginR2", "parse_margin_init"]

_STD_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*std\s*$")
_MARGIN_INIT_HELP = "'max' (max|W| when the loss switches on), '<k>std' such as '3std', or a positive number"


def parse_margin_init(value: object) -> tuple[str, float]:
    """``margin_init`` -> ("max", 0) | ("std", k) | ("abs", value); ConfigError otherwise."""
    if isinstance(value, str):
        if value.strip() == "max":
            return "max", 0.0
        match = _STD_MULTIPLE.match(value)
        if match and float(match.group(1)) > 0:
            return "std", float(match.group(1))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return "abs", float(value)
    raise ConfigError("r2.margin_init", value, _MARGIN_INIT_HELP)


@register_r2_loss("margin")
class MarginR2(R2Loss):
    """``R(W) = M^2 + reduce_i max(|w_i| - |M|, 0)`` with one learnable M per layer.

    Args:
        margin_init: how M starts when the loss switches on: ``"max"`` (default,
            ``max|W|``, so the hinge starts at zero), ``"<k>std"`` (k standard
            deviations of W) or a positive absolute value.
    """

    own_options = ("margin_init",)

    def __init__(self, model: nn.Module, strength: float, *, margin_init: str | float = "max", **common) -> None:
        super().__init__(model, strength, **common)
        self.margin_init = margin_init
        self._init_rule = parse_margin_init(margin_init)
        self.margins = nn.ParameterList(
            nn.Parameter(w.new_zeros(self._scalar_shape(w)).detach()) for w in self._weights
        )

    def reset_parameters(self) -> None:
        rule, k = self._init_rule
        for weight, m in zip(self._weights, self.margins):
            rows = weight.reshape(weight.shape[0], -1) if self.per_channel else weight.reshape(1, -1)
            if rule == "max":
                start = rows.abs().amax(1)
            elif rule == "std":
                start = k * rows.std(1)
            else:
                start = torch.full((rows.shape[0],), k, dtype=weight.dtype, device=weight.device)
            m.copy_(start.reshape(m.shape))

    def layer_penalty(self, index: int, weight: Tensor) -> Tensor:
        return F.margin(
            weight, self.margins[index], self.reduction, granularity=self.granularity, sparse_grad=True
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", margin_init={self.margin_init!r}"

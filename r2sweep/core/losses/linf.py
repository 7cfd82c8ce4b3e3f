"""L-inf R2 (R2LOSS.md 2.1): penalize each layer's largest absolute weight."""

from __future__ import annotations

from torch import Tensor

from r2sweep.core.losses import functional as F
from r2sweep.core.losses.base import R2Loss, register_r2_loss

__all__ = ["LinfR2"]


@register_r2_loss("linf")
class LinfR2(R2Loss):
    """``R(W) = max_i |w_i|``; each step moves only the arg-max weight(s)."""

    def layer_penalty(self, index: int, weight: Tensor) -> Tensor:
        return F.linf(weight, granularity=self.granularity, sparse_grad=True)

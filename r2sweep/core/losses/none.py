"""The ``none`` kind: no range restriction (the baseline every sweep compares with)."""

from __future__ import annotations

from torch import Tensor

from r2sweep.core.losses.base import R2Loss, register_r2_loss

__all__ = ["NoR2"]


@register_r2_loss("none")
class NoR2(R2Loss):
    """Always zero, whatever the strength."""

    @property
    def active(self) -> bool:
        return False

    def layer_penalty(self, index: int, weight: Tensor) -> Tensor:
        return weight.new_zeros(())

"""``method: dkm``: differentiable k-means weight clustering (palettization), weights only.

The algorithm is :func:`r2sweep.core.quant.finetune.dkm_compress`; this module
holds its knobs and runs it on a trial's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from r2sweep.core.quant.finetune import dkm_compress
from r2sweep.core.quant.methods.base import DownstreamContext, FineTuneConfig, register_method
from r2sweep.core.validate import check, require_int

__all__ = ["DKMConfig", "quantize"]


@dataclass
class DKMConfig(FineTuneConfig):
    """A ``method: dkm`` entry: the fine-tuning and the soft clustering's temperature, iterations, dimension."""

    method: ClassVar[str] = "dkm"
    algorithms: ClassVar[tuple[str, ...]] = ("dkm",)
    default_algorithm: ClassVar[str] = "dkm"
    weights_only: ClassVar[bool] = True

    tau: float = 0.05
    dkm_iters: int = 3
    cluster_dim: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.section
        check(self.tau > 0, f"{s}.tau", self.tau, "a number > 0 (relative to the layer's weight variance)")
        require_int(f"{s}.dkm_iters", self.dkm_iters, 1)
        require_int(f"{s}.cluster_dim", self.cluster_dim, 1)


@register_method(DKMConfig)
def quantize(model: nn.Module, entry: DKMConfig, weight_bits: int, context: DownstreamContext) -> nn.Module:
    """Fine-tune a copy with soft clustering; in eval mode each layer holds at most ``2^bits`` values."""
    return dkm_compress(model, entry, weight_bits, context.fine_tune_loader(entry), context.device,
                        **context.fine_tune_options(entry, weight_bits))

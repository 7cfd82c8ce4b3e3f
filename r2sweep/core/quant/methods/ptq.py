"""``method: ptq``: post-training quantization (round-to-nearest or AdaRound), no fine-tuning.

The algorithm is :func:`r2sweep.core.quant.ptq.post_training_quantize`; this
module holds its knobs and runs it on a trial's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from r2sweep.core.data import make_loader
from r2sweep.core.quant.adaround import AdaRoundSettings
from r2sweep.core.quant.fake import OBSERVERS, RANGES
from r2sweep.core.quant.methods.base import (
    DEFAULT_RANGE,
    DEFAULT_SYMMETRIC,
    DownstreamContext,
    MethodConfig,
    Rounding,
    register_method,
)
from r2sweep.core.quant.ptq import post_training_quantize
from r2sweep.core.validate import check, require_int

__all__ = ["PTQConfig", "quantize"]

_ADAROUND_FIELDS = ("adaround_iters", "adaround_lambda", "adaround_lr")


@dataclass
class PTQConfig(MethodConfig):
    """A ``method: ptq`` entry: the weight grid, activation calibration, BatchNorm handling, AdaRound."""

    method: ClassVar[str] = "ptq"
    algorithms: ClassVar[tuple[str, ...]] = ("rtn", "adaround")
    default_algorithm: ClassVar[str] = "adaround"

    symmetric: bool = DEFAULT_SYMMETRIC
    range: str = DEFAULT_RANGE
    act_observer: str = "minmax"
    calib_samples: int = 256
    bn_fold: Optional[bool] = None  # None: fold unless bn_reestimate
    bn_reestimate: bool = False
    bn_batches: int = 8
    adaround_iters: int = 1000
    adaround_lambda: float = 0.01
    adaround_lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.section
        check(self.range in RANGES, f"{s}.range", self.range, f"one of {list(RANGES)}")
        check(self.act_observer in OBSERVERS, f"{s}.act_observer", self.act_observer, f"one of {list(OBSERVERS)}")
        if self.bn_fold is None:
            self.bn_fold = not self.bn_reestimate
        check(not (self.bn_fold and self.bn_reestimate), f"{s}.bn_fold", self.bn_fold,
              "false when bn_reestimate is true (folded BatchNorms have no statistics left to re-estimate)")
        require_int(f"{s}.calib_samples", self.calib_samples, 1)
        require_int(f"{s}.bn_batches", self.bn_batches, 1)
        self.adaround_settings()  # validates the AdaRound knobs

    def _unused(self, prefix: str) -> dict[str, str]:
        unused = {}
        if self.algorithm != "adaround":
            unused.update(dict.fromkeys(_ADAROUND_FIELDS, f"{prefix}.algorithm={self.algorithm}"))
        if not self.bn_reestimate:
            unused["bn_batches"] = f"{prefix}.bn_reestimate=false"
        return unused

    def adaround_settings(self, seed: int = 0) -> AdaRoundSettings:
        return AdaRoundSettings(iterations=self.adaround_iters, lr=self.adaround_lr, lambda_r=self.adaround_lambda, seed=seed)

    def rounding(self) -> Rounding:
        return Rounding(self.granularity, self.keep_first_last_bits, self.symmetric, self.range, bool(self.bn_fold))


@register_method(PTQConfig)
def quantize(model: nn.Module, entry: PTQConfig, weight_bits: int, context: DownstreamContext) -> nn.Module:
    """Quantize on ``entry.calib_samples`` training images; BN re-estimation (when set) on training batches."""
    calibration = context.calibration_images(entry.calib_samples).to(context.device)
    loader = make_loader(context.data.train, context.train_batch_size, shuffle=True, seed=context.seed)
    bn_batches = ((x.to(context.device), y) for x, y in loader)
    return post_training_quantize(model, entry, weight_bits, calibration, bn_batches, seed=context.seed)

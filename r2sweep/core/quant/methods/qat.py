"""``method: qat``: quantization-aware fine-tuning with learned steps (LSQ, LSQ+) or EWGS.

The algorithm is :func:`r2sweep.core.quant.finetune.quantization_aware_train`;
this module holds its knobs and runs it on a trial's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.quant.finetune import quantization_aware_train
from r2sweep.core.quant.methods.base import DownstreamContext, FineTuneConfig, register_method
from r2sweep.core.validate import check

__all__ = ["QATConfig", "quantize", "INIT_IMAGES"]

#: Training images whose first pass sets every quantizer's initial step (PTQ's default calib_samples).
INIT_IMAGES = 256


@dataclass
class QATConfig(FineTuneConfig):
    """A ``method: qat`` entry: the fine-tuning, the quantizers' own lr and EWGS's gradient scaling."""

    method: ClassVar[str] = "qat"
    algorithms: ClassVar[tuple[str, ...]] = ("lsq", "lsqplus", "ewgs")
    default_algorithm: ClassVar[str] = "lsq"

    starts: ClassVar[tuple[str, ...]] = ("ptq", "paper")

    quant_lr: Optional[float] = None  # None: the same as lr
    delta: float = 1e-3
    # LSQ's steps: "ptq" starts on PTQ's MSE grid (epoch 0 is the RTN result at these bits);
    # "paper" on LSQ's 2 mean|x| / sqrt(Qp), which took an unseen ShuffleNet from 59% to 19%.
    start: str = "ptq"

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.section
        check(self.quant_lr is None or self.quant_lr > 0, f"{s}.quant_lr", self.quant_lr, "a number > 0 (or null: the same as lr)")
        check(self.delta >= 0, f"{s}.delta", self.delta, "a number >= 0 (0 is the plain straight-through estimator)")
        check(self.start in self.starts, f"{s}.start", self.start,
              f"one of {list(self.starts)} (ptq: LSQ's steps start on PTQ's MSE grid; paper: LSQ's own initialization)")

    def _check_act_bits(self) -> None:
        super()._check_act_bits()
        if self.act_bits == 1:
            raise ConfigError(f"{self.section}.act_bits", 1, "2 to 8 or 32 for qat (1-bit activations after ReLU would be a step function)")

    @property
    def quantizer_lr(self) -> Optional[float]:
        return self.quant_lr

    def _unused(self, prefix: str) -> dict[str, str]:
        unused = {} if self.algorithm == "ewgs" else {"delta": f"{prefix}.algorithm={self.algorithm}"}
        if self.algorithm != "lsq":
            unused["start"] = f"{prefix}.algorithm={self.algorithm}"
        return unused


@register_method(QATConfig)
def quantize(model: nn.Module, entry: QATConfig, weight_bits: int, context: DownstreamContext) -> nn.Module:
    """Fine-tune a fake-quantized copy, its quantizers initialized on :data:`INIT_IMAGES` training images."""
    calibration = context.calibration_images(INIT_IMAGES)
    return quantization_aware_train(model, entry, weight_bits, context.fine_tune_loader(entry), calibration, context.device,
                                    **context.fine_tune_options(entry, weight_bits))

"""``method: ptq``: post-training quantization (round-to-nearest, AdaRound, BRECQ, QDrop), no fine-tuning.

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
from r2sweep.core.quant.ptq import RECONSTRUCTIONS, post_training_quantize
from r2sweep.core.quant.reconstruct import ReconstructionSettings
from r2sweep.core.validate import check, is_number, require_int

__all__ = ["PTQConfig", "quantize"]

_ADAROUND_FIELDS = ("adaround_iters", "adaround_lambda", "adaround_lr")


@dataclass
class PTQConfig(MethodConfig):
    """A ``method: ptq`` entry: the weight grid, activation calibration, BatchNorm handling, AdaRound."""

    method: ClassVar[str] = "ptq"
    algorithms: ClassVar[tuple[str, ...]] = ("rtn", "adaround", *RECONSTRUCTIONS)
    default_algorithm: ClassVar[str] = "adaround"

    symmetric: bool = DEFAULT_SYMMETRIC
    range: str = DEFAULT_RANGE
    act_observer: str = "minmax"
    calib_samples: int = 256
    bn_fold: Optional[bool] = None  # None: fold unless bn_reestimate
    bn_reestimate: bool = False
    bn_batches: int = 8
    adaround_iters: int = AdaRoundSettings.iterations
    adaround_lambda: float = AdaRoundSettings.lambda_r
    adaround_lr: float = AdaRoundSettings.lr
    # BRECQ and QDrop (the rounding is AdaRound's, with the adaround_* knobs above).
    fisher: bool = True
    act_lr: float = 4e-5
    drop_prob: float = 0.5

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
        check(isinstance(self.fisher, bool), f"{s}.fisher", self.fisher, "true or false")
        check(is_number(self.act_lr) and self.act_lr >= 0, f"{s}.act_lr", self.act_lr, "a number >= 0 (0: steps kept)")
        check(is_number(self.drop_prob) and 0 <= self.drop_prob < 1, f"{s}.drop_prob", self.drop_prob,
              "a probability in [0, 1) (QDrop's 0.5; 0 is BRECQ)")

    def _unused(self, prefix: str) -> dict[str, str]:
        unused = {}
        because = f"{prefix}.algorithm={self.algorithm}"
        if self.algorithm == "rtn":
            unused.update(dict.fromkeys(_ADAROUND_FIELDS, because))
        if self.algorithm not in RECONSTRUCTIONS:
            unused.update(dict.fromkeys(("fisher", "act_lr"), because))
        elif self.float_activations:
            unused["act_lr"] = f"{prefix}.act_bits={self.act_bits}"
        if self.algorithm != "qdrop":
            unused["drop_prob"] = because
        if not self.bn_reestimate:
            unused["bn_batches"] = f"{prefix}.bn_reestimate=false"
        return unused

    def adaround_settings(self, seed: int = 0) -> AdaRoundSettings:
        return AdaRoundSettings(iterations=self.adaround_iters, lr=self.adaround_lr, lambda_r=self.adaround_lambda, seed=seed)

    def reconstruction_settings(self, seed: int = 0) -> ReconstructionSettings:
        """BRECQ's settings; QDrop's with ``drop_prob`` (BRECQ never drops)."""
        drop = self.drop_prob if self.algorithm == "qdrop" else 0.0
        return ReconstructionSettings(self.adaround_settings(seed), self.fisher, self.act_lr, drop)

    def rounding(self) -> Rounding:
        return Rounding(self.granularity, self.keep_first_last_bits, self.symmetric, self.range, bool(self.bn_fold))


@register_method(PTQConfig)
def quantize(model: nn.Module, entry: PTQConfig, weight_bits: int, context: DownstreamContext) -> nn.Module:
    """Quantize on ``entry.calib_samples`` training images (and their labels: BRECQ's Fisher weights);
    BN re-estimation (when set) on training batches."""
    calibration, labels = context.calibration_set(entry.calib_samples)
    loader = make_loader(context.data.train, context.train_batch_size, shuffle=True, seed=context.seed)
    bn_batches = ((x.to(context.device), y) for x, y in loader)
    name = entry.result_name(weight_bits)
    return post_training_quantize(model, entry, weight_bits, calibration.to(context.device), bn_batches,
                                  seed=context.seed, labels=labels, progress=lambda line: context.progress(f"  {name}: {line}"))

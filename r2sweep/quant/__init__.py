"""Fake quantization of weights and activations, BatchNorm folding and re-estimation."""

from __future__ import annotations

from r2sweep.quant.fake import (
    GRANULARITIES,
    OBSERVERS,
    RANGES,
    ActivationQuantizer,
    QuantSpec,
    binarize,
    fake_quantize,
    qrange,
    quantize_weight,
    weight_qparams,
)
from r2sweep.quant.fold import conv_bn_pairs, fold_batchnorm, reestimate_bn

__all__ = [
    "GRANULARITIES",
    "OBSERVERS",
    "RANGES",
    "ActivationQuantizer",
    "QuantSpec",
    "binarize",
    "conv_bn_pairs",
    "fake_quantize",
    "fold_batchnorm",
    "qrange",
    "quantize_weight",
    "reestimate_bn",
    "weight_qparams",
]

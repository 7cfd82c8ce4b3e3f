"""Low-bit downstream methods: fake quantization, PTQ (RTN, AdaRound, BRECQ, QDrop), QAT (LSQ, EWGS), DKM.

Building blocks live in their own modules (``fake``, ``fold``, ``adaround``,
``reconstruct`` and ``blocks`` (block reconstruction), ``qat``, ``dkm``, ``layers``,
``graph``: which layers are first and last, which BatchNorms fold); the whole-model pipelines are
:func:`post_training_quantize`, :func:`quantization_aware_train` and
:func:`dkm_compress`. ``methods`` registers each under its ``downstream.N.method``
name with its config class (:class:`PTQConfig`, :class:`QATConfig`,
:class:`DKMConfig`) and the handler a trial calls.
"""

from __future__ import annotations

from r2sweep.core.quant.adaround import AdaRoundSettings, adaround_layer
from r2sweep.core.quant.dkm import DkmClusterer
from r2sweep.core.quant.fake import (
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
from r2sweep.core.quant.finetune import dkm_compress, quantization_aware_train
from r2sweep.core.quant.fold import conv_bn_pairs, fold_batchnorm, reestimate_bn
from r2sweep.core.graph import EdgeLayers, edge_layers, graph_notes
from r2sweep.core.quant.layers import QuantLayer, bake_weights, wrap_layers
from r2sweep.core.quant.methods import (
    DOWNSTREAM_METHODS,
    DKMConfig,
    MethodConfig,
    PTQConfig,
    QATConfig,
    load_downstream,
)
from r2sweep.core.quant.ptq import post_training_quantize
from r2sweep.core.quant.qat import EwgsQuantizer, LsqQuantizer

__all__ = [
    "DOWNSTREAM_METHODS",
    "GRANULARITIES",
    "OBSERVERS",
    "RANGES",
    "ActivationQuantizer",
    "AdaRoundSettings",
    "DKMConfig",
    "DkmClusterer",
    "EdgeLayers",
    "EwgsQuantizer",
    "LsqQuantizer",
    "MethodConfig",
    "PTQConfig",
    "QATConfig",
    "QuantLayer",
    "QuantSpec",
    "adaround_layer",
    "bake_weights",
    "binarize",
    "conv_bn_pairs",
    "dkm_compress",
    "edge_layers",
    "fake_quantize",
    "fold_batchnorm",
    "graph_notes",
    "load_downstream",
    "post_training_quantize",
    "qrange",
    "quantization_aware_train",
    "quantize_weight",
    "reestimate_bn",
    "weight_qparams",
    "wrap_layers",
]

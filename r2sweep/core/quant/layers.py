"""Swapping a model's conv (1d/2d/3d) and Linear layers for quantized ones.

Every downstream method (PTQ, QAT, DKM) works on the same shape of network: each
Conv1d/2d/3d and Linear becomes a :class:`QuantLayer` whose weight passes through a
weight quantizer and whose input passes through an activation quantizer before
the original operation runs. Quantizing a layer's *input* (rather than each
activation function's output) covers every tensor that reaches an integer
kernel, including the linear bottlenecks of MobileNet-V2 and the residual sums
of ResNet, without knowing the architecture.

The quantizers are plain modules (``nn.Identity`` when a side stays in float),
so one wrapper serves round-to-nearest, AdaRound, LSQ, EWGS and DKM alike.
Which layers are the "first and last" (kept at ``keep_first_last_bits``) is
decided on the data-flow graph, by :func:`r2sweep.core.graph.edge_layers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from r2sweep.core.quant.fold import batch_inputs
from r2sweep.core.graph import (
    CONV_TYPES,
    QUANTIZABLE_TYPES,
    EdgeLayers,
    edge_layers,
    is_low_bit,
    low_bit_layers,
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "LayerInfo",
    "QuantLayer",
    "bake_weights",
    "input_is_nonnegative",
    "layer_bits",
    "quant_layers",
    "wrap_layers",
]


@dataclass(frozen=True)
class LayerInfo:
    """What a quantizer factory knows about the layer it quantizes.

    ``first`` and ``last`` follow the data flow (:func:`~r2sweep.core.graph.edge_layers`),
    not ``index``, which is only the layer's position in module order.
    """

    name: str
    layer: nn.Module
    index: int  # position among the quantizable layers, in module order
    count: int  # number of quantizable layers
    first: bool  # sees the model's input through no other quantizable layer
    last: bool  # its output reaches the model's output through no other

    @property
    def first_or_last(self) -> bool:
        """Whether this layer keeps ``keep_first_last_bits``: the one rule every factory reads."""
        return self.first or self.last

    @property
    def out_channels(self) -> int:
        return int(self.layer.weight.shape[0])


class QuantLayer(nn.Module):
    """A Conv1d/2d/3d or Linear that quantizes its input and its weight on every call.

    The original layer is kept as ``self.layer`` (its weight stays the float
    master copy that QAT and DKM train); ``weight_quantizer`` maps that weight to
    the one used, ``input_quantizer`` maps the input.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: nn.Module, input_quantizer: nn.Module) -> None:
        super().__init__()
        if not is_low_bit(layer):
            raise TypeError(f"QuantLayer wraps a Conv1d/2d/3d or Linear with a weight Parameter of its own, got {type(layer).__name__}")
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        # Set by wrap_layers: the first and last layer often keep 8 bits.
        self.first_or_last = False

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.layer.weight)

    # A parent that reads its child's parameters instead of calling it (nn.MultiheadAttention passes
    # out_proj.weight and .bias to its functional form) gets the weight as this layer uses it. Its
    # input then bypasses input_quantizer: that activation stays float.
    @property
    def weight(self) -> Tensor:
        return self.quantized_weight()

    @property
    def bias(self) -> Tensor | None:
        return self.layer.bias

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        weight = self.quantized_weight()
        if isinstance(self.layer, CONV_TYPES):
            # _conv_forward keeps the layer's stride, padding (mode), dilation and groups.
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


def layer_bits(first_or_last: bool, bits: int, keep_first_last_bits: int | None) -> int:
    """The bit width of a layer: ``keep_first_last_bits`` for the first and last layer when set."""
    if keep_first_last_bits is not None and first_or_last:
        return keep_first_last_bits
    return bits


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


QuantizerFactory = Callable[[LayerInfo], nn.Module]


def wrap_layers(
    model: nn.Module,
    weight_quantizer: QuantizerFactory,
    input_quantizer: QuantizerFactory,
    edges: EdgeLayers | None = None,
) -> nn.Module:
    """Replace every Conv1d/2d/3d and Linear of ``model`` (in place) by a :class:`QuantLayer`.

    The factories are called once per layer with its :class:`LayerInfo` and
    return the module to use (``nn.Identity()`` keeps that side in float).

    Args:
        edges: the first and last layers; None: ``edge_layers(model)``. A
            caller wrapping a copy passes those of the original, whose trace is cached.

    Returns:
        ``model``, for chaining.
    """
    if edges is None:
        edges = edge_layers(model)
    layers = low_bit_layers(model)
    for index, (name, layer) in enumerate(layers):
        info = LayerInfo(name, layer, index, len(layers), name in edges.first, name in edges.last)
        wrapper = QuantLayer(layer, weight_quantizer(info), input_quantizer(info))
        wrapper.first_or_last = info.first_or_last
        _replace(model, name, wrapper)
    return model


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, wrapper)`` of every :class:`QuantLayer` in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLayer)]


@torch.no_grad()
def input_is_nonnegative(model: nn.Module, batches: Iterable[object], num_batches: int = 2) -> dict[str, bool]:
    """For each conv and Linear layer, whether every input it saw on a few batches was >= 0.

    Inputs after a ReLU are non-negative and get an unsigned activation grid
    (all ``2^b`` levels on ``[0, max]``); the others (the image, linear
    bottlenecks, residual sums) need a signed one.
    """
    layers = low_bit_layers(model)
    nonnegative = {name: True for name, _ in layers}
    handles = []
    for name, layer in layers:

        def record(_module: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            if nonnegative[name] and bool((args[0] < 0).any()):
                nonnegative[name] = False

        handles.append(layer.register_forward_pre_hook(record))
    was_training = model.training
    model.eval()
    try:
        for used, batch in enumerate(batches):
            if used >= num_batches:
                break
            model(batch_inputs(batch))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return nonnegative


@torch.no_grad()
def bake_weights(model: nn.Module) -> nn.Module:
    """Write each layer's quantized weight (as evaluation uses it) into its weight, in place.

    The weight quantizers become ``nn.Identity``; input quantizers stay. The
    result holds the deployable values directly (at most ``2^b`` per layer for
    a ``b``-bit grid or palette), which is what gets checkpointed and counted.
    """
    was_training = model.training
    model.eval()
    for _, wrapper in quant_layers(model):
        wrapper.layer.weight.copy_(wrapper.quantized_weight())
        wrapper.weight_quantizer = nn.Identity()
    model.train(was_training)
    return model

"""Which layers are low-bit, and what R2 and the quantizers need to know about a model's data flow.

One rule (:func:`low_bit_layers`) says which weights are low-bit: R2 restricts
exactly those and every downstream method quantizes exactly those, so a weight is
never restricted without being quantized, or quantized without being restricted.

The other facts depend on the graph rather than on how ``__init__`` registered the
modules:

* the *edge layers* (:func:`edge_layers`): the quantizable layers that see the
  network's input, or produce its output, through no other quantizable layer.
  Those keep ``keep_first_last_bits``. A model that registers its classifier
  before its stem, or has a two-branch stem, gets the right ones.
* the conv-then-BatchNorm pairs that can be folded (:func:`conv_bn_pairs`).
* the order in which the forward calls the quantizable layers (:func:`layer_calls`),
  which block reconstruction follows.

Both come from one ``torch.fx`` trace of the model in eval mode (the inference
graph is the one deployed). A model fx cannot trace (data-dependent control
flow such as ``if x.sum() > 0:``) still quantizes: its edge layers fall back to
module order (the first and the last quantizable module), it has no foldable
pairs, and :func:`graph_notes` gives the line a trial logs to say so.

Tracing costs milliseconds to tens of milliseconds, and the per-epoch proxy
asks for these facts every epoch, so the result is cached per model object
(weakly: the cache never keeps a model alive) and recomputed when the model's
modules change (a name, a module replaced, a type).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "CONV_TYPES",
    "QUANTIZABLE_TYPES",
    "EdgeLayers",
    "conv_bn_pairs",
    "edge_layers",
    "graph_notes",
    "is_low_bit",
    "layer_calls",
    "low_bit_layers",
]

#: Convolutions a :class:`~r2sweep.core.quant.layers.QuantLayer` wraps (``_conv_forward`` handles any dims and groups).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The layer types whose weights can be low-bit (depthwise and pointwise convolutions are Conv2d too).
QUANTIZABLE_TYPES = (*CONV_TYPES, nn.Linear)


def is_low_bit(module: nn.Module) -> bool:
    """Whether ``module``'s weight is restricted by R2 and quantized downstream: the one rule.

    A Conv1d/2d/3d or Linear (a subclass too, such as attention's ``out_proj``) whose
    ``weight`` is a Parameter of its own. A weight computed by a parametrization
    (``torch.nn.utils.parametrize``: weight norm, spectral norm) is not: R2 would
    restrict a tensor the optimizer never updates, so the layer stays float, and
    :func:`graph_notes` says so. Norm layers and biases stay float (R2LOSS.md 2).
    """
    return isinstance(module, QUANTIZABLE_TYPES) and isinstance(module._parameters.get("weight"), nn.Parameter)


def low_bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every low-bit layer of ``model`` (:func:`is_low_bit`), in module order."""
    return [(name, module) for name, module in model.named_modules() if is_low_bit(module)]


# The BatchNorm that may fold into each conv type: the same number of spatial dims.
_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}

# Reasons longer than this are cut: the note is one log line.
_REASON_CHARS = 160


@dataclass(frozen=True)
class EdgeLayers:
    """The first and last quantizable layers of a model, by ``named_modules()`` name.

    Attributes:
        first: layers reachable from the input through no other quantizable layer.
        last: layers from which the output is reachable through no other quantizable layer.
        traced: whether these come from the ``torch.fx`` graph; False: module order.
        reason: why fx could not trace the model (one line), None when ``traced``.
    """

    first: frozenset[str]
    last: frozenset[str]
    traced: bool
    reason: str | None = None

    def first_or_last(self, name: str) -> bool:
        """Whether the layer ``name`` is a first or a last layer (keeps ``keep_first_last_bits``)."""
        return name in self.first or name in self.last


class _Facts(NamedTuple):
    # Only names and flags: a cached value must not reference the model (its key).
    edges: EdgeLayers
    pairs: tuple[tuple[str, str], ...]
    calls: tuple[str, ...] | None  # quantizable layers' calls in execution order; None: not traced


class _Tracer(fx.Tracer):
    """fx's tracer, with every quantizable layer a leaf (a user subclass of Conv2d too).

    fx only treats ``torch.nn``'s own modules as leaves; a subclass defined elsewhere
    would be traced through and vanish from the graph while ``wrap_layers`` (which
    tests ``isinstance``) still wraps it.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QUANTIZABLE_TYPES) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    """The eval-mode fx graph of ``model``, leaving ``model`` as it was.

    fx stores tensor constants it meets as new attributes of the root
    (``_tensor_constant0``); those are removed again, and every module's
    ``training`` flag is restored. The flags are set directly rather than by
    ``eval()``, which a module may override with side effects. Leaf modules
    (convs, BNs) do not run; the rest of ``forward`` runs once on fx proxies.
    """
    modes = {m: m.training for m in model.modules()}
    attributes = set(vars(model))
    try:
        for module in modes:
            module.training = False
        return _Tracer().trace(model)
    finally:
        for module, mode in modes.items():
            module.training = mode
        for added in set(vars(model)) - attributes:
            delattr(model, added)


def _reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
    return line if len(line) <= _REASON_CHARS else line[: _REASON_CHARS - 3] + "..."


def _quantizable(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    module = modules.get(node.target)
    return node.op == "call_module" and module is not None and is_low_bit(module)


def _reach(starts: list[fx.Node], step, modules: dict[str, nn.Module]) -> frozenset[str]:
    """The quantizable layers reached from ``starts`` along ``step`` without passing through one."""
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        for nxt in step(node):
            if nxt in seen:
                continue
            seen.add(nxt)
            if _quantizable(nxt, modules):
                found.add(nxt.target)  # a boundary: what lies beyond it is not an edge
            else:
                stack.append(nxt)
    return frozenset(found)


def _traced_edges(graph: fx.Graph, modules: dict[str, nn.Module]) -> EdgeLayers:
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    first = _reach(inputs, lambda n: list(n.users), modules)
    last = _reach(outputs, lambda n: n.all_input_nodes, modules)
    return EdgeLayers(first, last, traced=True)


def _module_order_edges(modules: dict[str, nn.Module], reason: str) -> EdgeLayers:
    names = [name for name, m in modules.items() if is_low_bit(m)]
    first = frozenset(names[:1])
    last = frozenset(names[-1:])
    return EdgeLayers(first, last, traced=False, reason=reason)


def _stock(module: nn.Module, base: type[nn.Module]) -> bool:
    # A subclass with its own forward (weight standardization, say) computes
    # something else from its weight: folding a BN into that weight would be wrong.
    kind = type(module)
    if kind.forward is not base.forward:
        return False
    return not isinstance(module, CONV_TYPES) or kind._conv_forward is base._conv_forward


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _foldable_pairs(graph: fx.Graph, modules: dict[str, nn.Module]) -> tuple[tuple[str, str], ...]:
    calls = _call_counts(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        # The BN's only input is the conv: no extra positional/keyword arguments.
        if len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv, bn = modules.get(source.target), modules[node.target]
        base = next((kind for kind in CONV_TYPES if isinstance(conv, kind)), None)
        if base is None or not isinstance(bn, _BN_FOR_CONV[base]):
            continue
        if not _stock(conv, base) or not _stock(bn, _BatchNorm):
            continue
        # Modules called more than once (shared): folding would change their other uses.
        if calls[source.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((source.target, node.target))
    return tuple(pairs)


def _fingerprint(model: nn.Module) -> tuple[tuple[str, type, int], ...]:
    # Cheap (a walk over the modules, no trace) and changes whenever a module is
    # added, removed, renamed or replaced (BN folded to Identity, a layer wrapped).
    return tuple((name, type(m), id(m)) for name, m in model.named_modules())


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, _Facts]] = weakref.WeakKeyDictionary()


def _facts(model: nn.Module) -> _Facts:
    fingerprint = _fingerprint(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    modules = dict(model.named_modules())
    try:
        graph = _trace(model)
    except Exception as error:  # noqa: BLE001  fx raises several types; all mean "not traceable"
        facts = _Facts(_module_order_edges(modules, _reason(error)), (), None)
    else:
        calls = tuple(node.target for node in graph.nodes if _quantizable(node, modules))
        facts = _Facts(_traced_edges(graph, modules), _foldable_pairs(graph, modules), calls)
    _CACHE[model] = (fingerprint, facts)
    return facts


def edge_layers(model: nn.Module) -> EdgeLayers:
    """The first and last quantizable layers of ``model``, from its ``torch.fx`` graph.

    The first layers are those the input reaches through no other quantizable
    (Conv1d/2d/3d, Linear) layer, the last those whose output reaches the
    model's output through no other. A plain CNN has its stem conv first and its
    classifier last, whatever order ``__init__`` registered them in; a two-branch
    stem has both branches first. Layers the forward never calls are neither.

    When fx cannot trace ``model``, the first and the last quantizable module of
    ``named_modules()`` are used instead, with ``traced=False`` and the reason.
    The model is traced in eval mode and left as it was; the result is cached
    for this model object until its modules change.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    >>> edges = edge_layers(net)
    >>> sorted(edges.first), sorted(edges.last), edges.traced
    (['0'], ['4'], True)
    """
    return _facts(model).edges


def graph_notes(model: nn.Module) -> list[str]:
    """The lines a trial logs about how ``model``'s graph was handled: when fx cannot trace it, and
    which weights stay float (attention's input projections)."""
    notes = []
    edges = edge_layers(model)
    if not edges.traced:
        notes.append(f"model is not torch.fx-traceable ({edges.reason}): first/last layers by module order, "
                     "BatchNorm left unfolded")
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        notes.append(f"{len(attention)} nn.MultiheadAttention layer(s) ({attention[0]}{', ...' if len(attention) > 1 else ''}): "
                     "their input projections (in_proj_weight, bare Parameters) stay float, neither quantized nor "
                     "restricted by R2; their out_proj weights are quantized, its inputs stay float")
    computed = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES) and not is_low_bit(m)]
    if computed:
        notes.append(f"{len(computed)} layer(s) with a computed weight ({computed[0]}{', ...' if len(computed) > 1 else ''}; "
                     "a parametrization such as weight or spectral norm): they stay float, neither quantized nor "
                     "restricted by R2")
    return notes


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` of every BatchNorm fed only by a conv that feeds nothing else.

    Conv1d/2d/3d pair with BatchNorm1d/2d/3d of the same dimensionality. Found on
    the ``torch.fx`` graph, so the pairs follow the data flow, not the module
    order. Modules called more than once (shared) are never paired: folding would
    change their other uses. Nor are convs or BNs of a subclass with its own
    forward. A model fx cannot trace has no pairs (see :func:`graph_notes`).
    """
    return list(_facts(model).pairs)


def layer_calls(model: nn.Module) -> tuple[str, ...] | None:
    """The quantizable layers as the forward calls them, in execution order (a layer called
    twice appears twice; one never called, not at all); None when fx cannot trace ``model``."""
    return _facts(model).calls

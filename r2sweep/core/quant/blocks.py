"""The units block reconstruction learns one at a time: a model's blocks, else its single layers.

BRECQ (Li et al. 2021) reconstructs the rounding of a whole block at once: a
ResNet basic block, a MobileNet-V2 inverted residual, a MobileNet-V1
depthwise-pointwise pair. Jointly, the layers of a block can trade one layer's
rounding error against the next's, which layer-wise AdaRound cannot.

What a block is, without naming architectures: a module (never the model itself)
that holds at least two quantizable layers (Conv1d/2d/3d, Linear) and

* whose children each hold at most one of them (a basic block: conv1, conv2,
  downsample; a depthwise-separable pair), or
* that holds them all through a single child which is itself a block (an
  inverted residual, whose ``conv`` sequence holds the layers: the outer module
  is the block, so that the residual addition is inside it).

The walk goes from the model down and stops at the first block on each branch,
so a stage of blocks (``layer1``) is never taken for one. Then the fx graph
(:func:`~r2sweep.core.graph.layer_calls`) has the last word: a block's
layers must each be called once and one after another, with no layer of the
rest of the network in between; a block that breaks that (a layer shared with
another part, a branch interleaved with the outside) is reconstructed layer by
layer instead. Layers in no block are units of their own (the stem, the
classifier), reconstructed like layer-wise AdaRound with the same loss.

A model fx cannot trace, or one with no block, falls back to layer-wise
reconstruction over the module order, and :attr:`Units.note` says so (a trial
logs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from r2sweep.core.graph import is_low_bit, layer_calls, low_bit_layers

__all__ = ["Unit", "Units", "reconstruction_units"]


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit: a block module, or a single layer (``layers == (name,)``)."""

    name: str  # the module's path in the model
    layers: tuple[str, ...]  # its quantizable layers, in execution order

    @property
    def is_block(self) -> bool:
        return self.name not in self.layers


@dataclass(frozen=True)
class Units:
    """The units of a model in execution order, and why some are not blocks (None: nothing to say)."""

    units: tuple[Unit, ...]
    note: str | None = None

    @property
    def blocks(self) -> tuple[Unit, ...]:
        return tuple(unit for unit in self.units if unit.is_block)


def _layer_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if is_low_bit(m))


def _is_block(module: nn.Module) -> bool:
    if is_low_bit(module) or _layer_count(module) < 2:
        return False
    holders = [child for child in module.children() if _layer_count(child) > 0]
    if all(_layer_count(child) == 1 for child in holders):
        return True
    return len(holders) == 1 and _is_block(holders[0])


def _candidates(module: nn.Module, prefix: str = "") -> list[tuple[str, bool]]:
    """``(path, is_block)`` for every block and every layer outside a block, in module order."""
    found: list[tuple[str, bool]] = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if is_low_bit(child):
            found.append((path, False))
        elif _is_block(child):
            found.append((path, True))
        else:
            found.extend(_candidates(child, path))
    return found


def _layers_in(model: nn.Module, path: str) -> list[str]:
    return [f"{path}.{name}" for name, m in model.get_submodule(path).named_modules()
            if is_low_bit(m)]


def reconstruction_units(model: nn.Module) -> Units:
    """The blocks of ``model`` and its layers outside them, in the order the forward calls them.

    Layers the forward never calls are not units. See the module docstring for what
    counts as a block and when the fallback (one unit per layer) applies.
    """
    calls = layer_calls(model)
    layer_names = [name for name, _ in low_bit_layers(model)]
    if calls is None:
        return Units(tuple(Unit(name, (name,)) for name in layer_names),
                     "model is not torch.fx-traceable: reconstructing layer by layer, in module order")
    position = {name: calls.index(name) for name in set(calls)}
    units: list[Unit] = []
    split: list[str] = []
    for path, block in _candidates(model):
        layers = _layers_in(model, path) if block else [path]
        layers = sorted((name for name in layers if name in position), key=position.__getitem__)
        if not layers:
            continue  # never called
        if block and not _called_together(layers, calls):
            split.append(path)
            units.extend(Unit(name, (name,)) for name in layers)
        elif block:
            units.append(Unit(path, tuple(layers)))
        else:
            units.append(Unit(path, (path,)))
    units.sort(key=lambda unit: position[unit.layers[0]])
    notes = []
    if not any(unit.is_block for unit in units):
        notes.append(f"no blocks recognized in {type(model).__name__}: reconstructing layer by layer")
    if split:
        notes.append(f"not reconstructed as blocks (a layer shared or interleaved with the rest): {', '.join(split)}")
    return Units(tuple(units), "; ".join(notes) or None)


def _called_together(layers: list[str], calls: tuple[str, ...]) -> bool:
    """Each layer called once, and the calls of ``layers`` consecutive in ``calls``."""
    if any(calls.count(name) != 1 for name in layers):
        return False
    first = calls.index(layers[0])
    return set(calls[first : first + len(layers)]) == set(layers)

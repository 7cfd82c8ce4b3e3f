"""Low-bit weights as a runtime holds them: integer codes bit-packed at their width, and what decodes them.

One layer's quantized weight (its values exactly as the trial evaluated them)
becomes, per output channel or once for the layer when every channel shares it,
a *grid*:

* **uniform**: ``value = (code + offset) * step`` in float32 (``code + offset`` exact,
  then one rounding), which reproduces a round-to-nearest grid ``(q - z) * s``, and a
  mid-rise one ``(k + 1/2) * s``, bit for bit; stored as ``step`` and ``offset`` (8 bytes);
* **table**: anything else (DKM's centroids, learned grids that are not exactly
  uniform in float32): the distinct values themselves, float32.

A grid is called uniform only when decoding it gives back every value bit for
bit, so :func:`unpack_weight` (``pack_weight``'s inverse) is exact whatever the
method, and :attr:`PackedWeight.nbytes` is what the packed form really takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PackedWeight", "pack_weight", "unpack_weight", "pack_codes", "unpack_codes", "UNIFORM_GRID_BYTES"]

#: A uniform grid's step and offset (float32 each).
UNIFORM_GRID_BYTES = 8
_FLOAT_BYTES = 4


def pack_codes(codes: np.ndarray, width: int) -> bytes:
    """Unsigned integer codes below ``2^width``, ``width`` bits each, least significant bit first."""
    codes = np.asarray(codes, dtype=np.uint32).ravel()
    if codes.size and int(codes.max()) >= 2 ** width:
        raise ValueError(f"a code of {int(codes.max())} does not fit {width} bits")
    bits = ((codes[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def unpack_codes(data: bytes, width: int, count: int) -> np.ndarray:
    """:func:`pack_codes`'s inverse: ``count`` codes of ``width`` bits."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=count * width)
    return (bits.reshape(count, width).astype(np.uint32) << np.arange(width, dtype=np.uint32)).sum(1).astype(np.uint32)


@dataclass(frozen=True)
class Grid:
    """Decodes a code to a value: uniform (``step``, ``offset``) or a table of values."""

    step: float | None = None
    offset: float = 0.0  # a whole or half-integer: the first level, in steps
    table: np.ndarray | None = None  # float32

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table[codes]
        return ((codes.astype(np.float32) + np.float32(self.offset)) * np.float32(self.step)).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return UNIFORM_GRID_BYTES if self.table is None else self.table.size * _FLOAT_BYTES


@dataclass(frozen=True)
class PackedWeight:
    """One layer's weight: packed codes, the grids (one shared, or one per output channel), the shape."""

    shape: tuple[int, ...]
    width: int
    codes: bytes
    grids: tuple[Grid, ...]

    @property
    def nbytes(self) -> int:
        return len(self.codes) + sum(g.nbytes for g in self.grids)


def _uniform_grid(values: np.ndarray, width: int) -> Grid | None:
    """A uniform grid that reproduces every one of ``values`` (sorted, distinct, float32) bit for bit, or None.

    The levels are ``values / step``: whole numbers for a mid-tread grid ``(q - z) * s``,
    half-integers for a mid-rise one ``(k + 1/2) * s``; the offset carries the half.
    """
    if values.size == 1:  # one value v: code 0 decodes to (0 + 1) * v, or to 0 * 1 for v = 0
        return Grid(step=float(values[0]), offset=1.0) if values[0] else Grid(step=1.0, offset=0.0)
    wide = values.astype(np.float64)
    # A channel need not use neighbouring levels: the step may be a fraction of the smallest gap.
    for parts in range(1, 2 ** width):
        step = float(np.diff(wide).min()) / parts
        ratios = wide / step
        # Mid-tread levels are whole numbers, mid-rise ones (k + 1/2): which one the fractions sit near.
        shift = 0.5 if float(np.median(np.abs(ratios - np.floor(ratios) - 0.5))) < 0.25 else 0.0
        levels = np.round(ratios - shift) + shift
        if levels.max() - levels.min() > 2 ** width - 1:
            return None
        if np.abs(ratios - levels).max() > 1e-2:
            continue
        step = float(wide @ levels / (levels @ levels))  # all values fitted: float32's error averages out
        if np.abs(wide / step - levels).max() > 1e-3:
            continue
        # The exact float32 step: each value implies one; the first that decodes every value wins. The
        # smallest levels first: v / 1 and v / (1/2) are exact, so a grid with level 1 or 1/2 takes one try.
        for index in np.argsort(np.where(levels == 0, np.inf, np.abs(levels)), kind="stable"):
            if levels[index] == 0:
                break
            candidate = np.float32(values[index] / np.float32(levels[index]))
            if np.array_equal((levels.astype(np.float32) * candidate).astype(np.float32), values):
                return Grid(step=float(candidate), offset=float(levels.min()))
        return None
    return None


def _grid(values: np.ndarray, width: int) -> Grid:
    # Two values cost 8 bytes as a table too; a binarized {-s, +s} is no (code + offset) * step.
    if values.size == 2:
        return Grid(table=values.astype(np.float32))
    return _uniform_grid(values, width) or Grid(table=values.astype(np.float32))


def _codes_of(row: np.ndarray, grid: Grid) -> np.ndarray:
    if grid.table is not None:
        return np.searchsorted(grid.table, row).astype(np.uint32)
    return np.round(row.astype(np.float64) / grid.step - grid.offset).astype(np.uint32)


@torch.no_grad()
def pack_weight(weight: Tensor, width: int) -> PackedWeight:
    """``weight``'s values as codes of ``width`` bits and their grids; exact (see :func:`unpack_weight`).

    Raises:
        ValueError: an output channel holds more distinct values than ``width`` bits index.
    """
    rows = weight.detach().float().cpu().reshape(weight.shape[0], -1).numpy()
    shared = np.unique(rows)
    if shared.size <= 2 ** width:
        tables = [shared]
    else:
        tables = [np.unique(row) for row in rows]
        most = max(t.size for t in tables)
        if most > 2 ** width:
            raise ValueError(f"a channel holds {most} distinct values: more than {width} bits index "
                             f"(the layer is not at that width)")
    grids = tuple(_grid(t, width) for t in tables)
    per_row = [grids[0]] * len(rows) if len(grids) == 1 else list(grids)
    codes = np.concatenate([_codes_of(row, grid) for row, grid in zip(rows, per_row)])
    packed = PackedWeight(tuple(weight.shape), width, pack_codes(codes, width), grids)
    # Every grid was checked to decode its own values exactly; this checks the codes too, once.
    if not torch.equal(unpack_weight(packed), weight.detach().float().cpu()):
        raise AssertionError("packing did not reproduce the weight: a bug in r2sweep.core.quant.packing")
    return packed


def unpack_weight(packed: PackedWeight) -> Tensor:
    """The weight as a float32 tensor, bit-identical to the one packed."""
    rows = packed.shape[0]
    per_row = math.prod(packed.shape[1:])
    codes = unpack_codes(packed.codes, packed.width, rows * per_row).reshape(rows, per_row)
    grids = packed.grids if len(packed.grids) == rows else packed.grids * rows
    values = np.stack([grid.decode(row) for grid, row in zip(grids, codes)])
    return torch.from_numpy(values.astype(np.float32)).reshape(packed.shape)

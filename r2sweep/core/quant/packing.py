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


def _uniform_rows_at_once(rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_uniform_grid`'s first try, for every row at once: (found, step, offset) per row.

    A row is found when its smallest gap is its step (its neighbouring levels are used)
    and it holds 3 or more distinct values; the others go through :func:`_grid` one by one.
    Vectorized because a per-channel layer has thousands of rows.
    """
    ordered = np.sort(rows, axis=1).astype(np.float64)
    gaps = np.diff(ordered, axis=1)
    distinct = (gaps > 0).sum(1) + 1
    step = np.where(gaps > 0, gaps, np.inf).min(1) if gaps.shape[1] else np.full(len(rows), np.inf)
    found = (distinct >= 3) & np.isfinite(step)
    step = np.where(found, step, 1.0)
    ratios = ordered / step[:, None]
    shift = np.where(np.median(np.abs(ratios - np.floor(ratios) - 0.5), axis=1) < 0.25, 0.5, 0.0)[:, None]
    levels = np.round(ratios - shift) + shift
    found &= (np.abs(ratios - levels).max(1) <= 1e-2) & (levels.max(1) - levels.min(1) <= 2 ** width - 1)
    # The exact float32 step, from the value at the smallest non-zero level (v / 1 and v / (1/2) are exact).
    nearest = np.where(levels == 0, np.inf, np.abs(levels)).argmin(1)
    picked = np.arange(len(rows))
    level = levels[picked, nearest].astype(np.float32)
    found &= level != 0
    candidate = (ordered[picked, nearest].astype(np.float32) / np.where(level == 0, np.float32(1), level)).astype(np.float32)
    decoded = (levels.astype(np.float32) * candidate[:, None]).astype(np.float32)
    found &= (decoded == ordered.astype(np.float32)).all(1)
    return found, candidate, levels.min(1)


@torch.no_grad()
def pack_weight(weight: Tensor, width: int) -> PackedWeight:
    """``weight``'s values as codes of ``width`` bits and their grids; exact (see :func:`unpack_weight`).

    Raises:
        ValueError: an output channel holds more distinct values than ``width`` bits index.
    """
    rows = weight.detach().float().cpu().reshape(weight.shape[0], -1).numpy()
    shared = np.unique(rows)
    if shared.size <= 2 ** width:
        grid = _grid(shared, width)
        codes = _codes_of(rows.ravel(), grid)
        grids: tuple[Grid, ...] = (grid,)
    else:
        most = int(((np.diff(np.sort(rows, axis=1), axis=1) != 0).sum(1) + 1).max())
        if most > 2 ** width:
            raise ValueError(f"a channel holds {most} distinct values: more than {width} bits index "
                             f"(the layer is not at that width)")
        found, steps, offsets = _uniform_rows_at_once(rows, width)
        per_row = [Grid(step=float(steps[i]), offset=float(offsets[i])) if found[i] else _grid(np.unique(rows[i]), width)
                   for i in range(len(rows))]
        code_rows = np.empty(rows.shape, dtype=np.uint32)
        code_rows[found] = np.round(rows[found].astype(np.float64) / steps[found, None].astype(np.float64)
                                    - offsets[found, None]).astype(np.uint32)
        for i in np.flatnonzero(~found):
            code_rows[i] = _codes_of(rows[i], per_row[i])
        codes, grids = code_rows.ravel(), tuple(per_row)
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
    if len(packed.grids) == 1:
        values = packed.grids[0].decode(codes)
    else:
        values = np.empty(codes.shape, dtype=np.float32)
        uniform = np.array([g.table is None for g in packed.grids])
        steps = np.array([g.step if g.table is None else 0.0 for g in packed.grids], dtype=np.float32)
        offsets = np.array([g.offset for g in packed.grids], dtype=np.float32)
        values[uniform] = ((codes[uniform].astype(np.float32) + offsets[uniform, None]) * steps[uniform, None]).astype(np.float32)
        for i in np.flatnonzero(~uniform):
            values[i] = packed.grids[i].decode(codes[i])
    return torch.from_numpy(values.astype(np.float32)).reshape(packed.shape)

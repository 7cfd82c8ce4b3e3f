"""Soft-Min-Max's autograd function: a compiled three-pass kernel, or eager PyTorch.

With p = softmax(alpha w) and q = softmax(-alpha w) over a group (the tensor, or one
output channel):
d smax/dw = p (1 + alpha (w - smax)),  d smax/dalpha = Var_p(w),
d smin/dw = q (1 - alpha (w - smin)),  d smin/dalpha = -Var_q(w).

On the CPU with float32 weights the passes run in ``kernels/softminmax.c`` (see
:mod:`r2sweep.core.losses.native`): the forward reads the weights twice, the
backward once. Anywhere else (an accelerator, float64, no C compiler) the same
formulas run as eager PyTorch operations into reused buffers. Both paths compute
the same values to float32 rounding; the tests hold each against float64 autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from r2sweep.core.losses import native

__all__ = ["SoftMinMaxBuffers", "SoftMinMaxFunction"]


# Beyond this exponent gap exp(-gap) leaves float32's normal range (1e-35 at 80).
_MAX_EXPONENT_GAP = 80.0


@dataclass
class SoftMinMaxBuffers:
    """Weight-sized work buffers of Soft-Min-Max, reused every step.

    Allocating them once spares a page-faulting allocation per step. ``saved`` holds
    what the backward pass reads (one set per layer); autograd's version counters
    guard them, so a second forward before the backward makes the backward raise
    instead of using stale values. ``scratch`` holds temporaries of the backward
    pass only, and may be one dict shared by every layer of a model: each buffer
    grows to the largest layer and smaller layers use a view of it.
    """

    saved: dict[str, Tensor] = field(default_factory=dict)
    scratch: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def _view(pool: dict[str, Tensor], name: str, like: Tensor, shape: tuple[int, ...] | None) -> Tensor:
        shape = tuple(like.shape) if shape is None else shape
        numel = math.prod(shape)
        flat = pool.get(name)
        if flat is None or flat.numel() < numel or flat.device != like.device or flat.dtype != like.dtype:
            flat = torch.empty(numel, dtype=like.dtype, device=like.device)
            pool[name] = flat
        return flat[:numel].view(shape)

    def get(self, name: str, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """A buffer with ``like``'s dtype and device, and its shape unless ``shape`` is given."""
        return self._view(self.saved, name, like, shape)

    def get_scratch(self, name: str, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        return self._view(self.scratch, name, like, shape)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b, dim=1, keepdim=True)`` of two (rows, K) tensors, without the product tensor."""
    if a.shape[0] == 1:  # one row: a plain dot product is several times faster than bmm
        return torch.dot(a.reshape(-1), b.reshape(-1)).view(1, 1)
    return torch.matmul(a.unsqueeze(1), b.unsqueeze(2)).view(-1, 1)


def _row_constants(t: Tensor, scalars: bool) -> list:
    """Per-row constants of one side: a (rows, 1) tensor, or a Python float for one CPU row.

    Element-wise kernels take a Python float on their fastest vectorised path; a
    broadcast (1, 1) tensor costs up to 3x more per element (and addcmul with two of
    them leaves the vectorised path altogether).
    """
    return [float(x) for x in t.reshape(-1)] if scalars else list(t.split(1, 1))


def _eager_forward(rows: Tensor, alpha: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Fill ``weights`` (rows, 2, K) with both sides' exponentials; return (sums, soft extremes).

    Both sides share one formula with a signed temperature, ``s a`` with s = +1 for the
    max and -1 for the min, and their unnormalised weights ``e = exp(s a (w - extreme))``
    share one buffer (side 0 the max, side 1 the min): the four sums are one ``sum``
    and one matrix-vector product. With one row on the CPU (the per-tensor default)
    every per-row constant is a Python float (see :func:`_row_constants`).
    """
    n_rows = rows.shape[0]
    scalars = n_rows == 1 and rows.device.type == "cpu"
    e_max, e_min = weights[:, 0], weights[:, 1]
    a = alpha.detach().reshape(-1, 1)
    row_max, row_min = rows.amax(1, keepdim=True), rows.amin(1, keepdim=True)
    (a_, max_), (min_,) = _row_constants(torch.cat((a, row_max), 1), scalars), _row_constants(row_min, scalars)
    # Shifting by the row's extreme keeps every exponent <= 0 (no overflow).
    torch.sub(rows, max_, out=e_max).mul_(a_).exp_()
    # exp(a (w - max)) * exp(-a (w - min)) = exp(-a (max - min)) for every w, so the
    # second exponential is one division. Exact while exp(-a (max - min)) stays a
    # normal float32 (a * range < 80); past that, or where a host check would stall
    # an accelerator, take the exponential again.
    exponent_gap = a * (row_max - row_min)
    if rows.device.type == "cpu" and float(exponent_gap.max()) < _MAX_EXPONENT_GAP:
        torch.div(torch.exp(-exponent_gap), e_max, out=e_min)
    else:
        torch.sub(rows, min_, out=e_min).mul_(-a_ if scalars else -a).exp_()
    sums = weights.sum(2)  # (rows, 2): S_max, S_min
    if n_rows == 1:
        # Two dot products, not one (2, K) matrix-vector product: as fast, and sdot
        # accumulates in blocks where sgemv's running sum loses ~10x more digits.
        dots = torch.stack([torch.dot(weights[0, side], rows[0]) for side in (0, 1)]).view(1, 2)
    else:
        dots = torch.matmul(weights, rows.unsqueeze(2)).view(n_rows, 2)
    return sums, dots / sums


def _eager_backward(
    rows: Tensor, a: Tensor, g: Tensor, weights: Tensor, sums: Tensor, soft: Tensor,
    buffers: SoftMinMaxBuffers, want_alpha: bool,
) -> tuple[Tensor, Tensor | None]:
    """(the gradient as (rows, K) or (rows, 1, K), the centred dots (rows, 2) or None)."""
    scalars = rows.shape[0] == 1 and rows.device.type == "cpu"
    signed_a = torch.cat((a, -a), 1)  # (rows, 2)
    scale = torch.cat((g, -g), 1) / sums  # grad = g (term_max / S_max - term_min / S_min)
    deviation = buffers.get_scratch("deviation", rows)
    terms = buffers.get_scratch("terms", weights)
    centred = []
    consts = zip(*(_row_constants(t, scalars) for t in (soft, signed_a)))
    for side, (soft_, signed_a_) in enumerate(consts):
        e, term = weights[:, side], terms[:, side]
        # d = s a (w - soft extreme), materialised so that the variance in alpha's
        # gradient comes from a centred sum: from raw moments it cancels
        # catastrophically once alpha is large (a concentrated softmax).
        torch.sub(rows, soft_, out=deviation).mul_(signed_a_)
        # term = e (1 + d) = S d(soft extreme)/dw
        torch.addcmul(e, e, deviation, out=term)
        if want_alpha:
            # <term, d> = S (sum p d + a^2 Var) with sum p d = 0 up to rounding.
            centred.append(_row_dot(term, deviation))
    # ``grad`` is a fresh tensor, not a kept buffer: autograd can then add the task
    # gradient into it in place instead of allocating the sum.
    if scalars:
        scale_max, scale_min = _row_constants(scale, True)
        grad = torch.mul(terms[:, 0], scale_max).add_(terms[:, 1], alpha=scale_min)
    else:
        grad = torch.matmul(scale.unsqueeze(1), terms)  # (rows, 1, K)
    return grad, torch.cat(centred, 1) if want_alpha else None


def _native_fits(w: Tensor, alpha: Tensor) -> bool:
    return (
        w.device.type == "cpu" and w.dtype == torch.float32 and alpha.dtype == torch.float32
        and w.is_contiguous()
    )


def _native_forward(library, rows: Tensor, alpha: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The eager forward's work in two passes (``kernels/softminmax.c``); sums in float64."""
    n_rows, row_len = rows.shape
    a = alpha.detach().reshape(-1).contiguous()
    stats = torch.empty(n_rows, 6, dtype=torch.float64)  # max, min, S_max, S_min, D_max, D_min
    threads = torch.get_num_threads()
    if library.r2_softminmax_forward(rows.data_ptr(), n_rows, row_len, a.data_ptr(), weights.data_ptr(),
                                     stats.data_ptr(), threads):
        raise MemoryError("Soft-Min-Max's kernel could not allocate its partial sums")
    # Written through a pointer, so tell autograd: a graph that saved ``weights`` before
    # this forward must refuse to run its backward, as it does on the eager path.
    torch.autograd.graph.increment_version(weights)
    sums = stats[:, 2:4]
    return sums, stats[:, 4:6] / sums


def _native_backward(
    library, rows: Tensor, a: Tensor, g: Tensor, weights: Tensor, sums: Tensor, soft: Tensor,
) -> tuple[Tensor, Tensor]:
    """The eager backward's work in one pass: (the gradient (rows, K), the centred dots)."""
    n_rows, row_len = rows.shape
    g64, a64 = g.double(), a.double()
    scale = torch.cat((g64, -g64), 1) / sums
    consts = torch.cat((a64, soft, scale), 1).float().contiguous()  # a, smax, smin, scale_max, scale_min
    grad = torch.empty_like(rows)  # fresh, as on the eager path
    centred = torch.empty(n_rows, 2, dtype=torch.float64)
    if library.r2_softminmax_backward(rows.data_ptr(), n_rows, row_len, weights.data_ptr(), consts.data_ptr(),
                                      grad.data_ptr(), centred.data_ptr(), torch.get_num_threads()):
        raise MemoryError("Soft-Min-Max's kernel could not allocate its partial sums")
    return grad, centred


class SoftMinMaxFunction(torch.autograd.Function):
    """smax(W) - smin(W) per tensor (or per channel) with softmax-weighted extremes.

    ``buffers`` keeps the (rows, 2, K) exponentials the backward reads (and, on the
    eager path, its temporaries) from one step to the next.
    """

    @staticmethod
    def forward(ctx, w, alpha, per_channel: bool, buffers):  # type: ignore[override]
        rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        n_rows, row_len = rows.shape
        weights = buffers.get("weights", rows, (n_rows, 2, row_len))
        library = native.softminmax_library() if _native_fits(w, alpha) else None
        if library is not None:
            sums, soft = _native_forward(library, rows, alpha, weights)
        else:
            sums, soft = _eager_forward(rows, alpha, weights)
        ctx.save_for_backward(w, alpha, weights, sums, soft)
        ctx.per_channel, ctx.buffers, ctx.library = per_channel, buffers, library
        value = (soft[:, 0] - soft[:, 1]).to(w.dtype)
        return value if per_channel else value.reshape(())

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w, alpha, weights, sums, soft = ctx.saved_tensors
        rows = w.reshape(w.shape[0], -1) if ctx.per_channel else w.reshape(1, -1)
        a = alpha.detach().reshape(-1, 1)
        g = grad_out.reshape(-1, 1)
        want_alpha = ctx.needs_input_grad[1]
        if ctx.library is not None:
            grad, centred = _native_backward(ctx.library, rows, a, g, weights, sums, soft)
        else:
            grad, centred = _eager_backward(rows, a, g, weights, sums, soft, ctx.buffers, want_alpha)
        grad_alpha = None
        if want_alpha:
            a_sq = (a * a).to(centred.dtype)
            variances = (centred[:, :1] / sums[:, :1] + centred[:, 1:] / sums[:, 1:]) / a_sq
            grad_alpha = (g.to(centred.dtype) * variances).to(alpha.dtype).reshape(alpha.shape)
        return grad.view(w.shape), grad_alpha, None, None

"""R2-Loss penalties on one weight tensor: the formulas of R2LOSS.md section 2.

Each function returns the penalty ``R(W)`` of one tensor (a scalar), or one value
per output channel with ``granularity="channel"``. They are written as custom
autograd functions because the obvious autograd versions spend the training step's
time allocating full-size temporaries (``|W|``, one-hot gradients, masks): on a CPU
each fresh tensor costs page faults, and the naive L-inf made a ResNet-18 step 2%
slower. Here:

* the forward passes read the weights with reductions that allocate nothing
  full-size (per-row ``amax``/``amin``), and only then touch the few rows that hold
  an extreme or an outlier;
* L-inf and Margin gradients reach only a handful of weights, so they can be
  returned as sparse tensors (``sparse_grad=True``): autograd adds them into the
  dense task gradient in place, at a cost proportional to their size;
* Soft-Min-Max's gradient is dense; on the CPU a compiled kernel computes it in three
  passes over the weights, elsewhere eager operations write into buffers the caller
  may keep across steps (:class:`SoftMinMaxBuffers`; see ``softminmax_function.py``).

Values are exact (the same formulas, no approximation); the tests compare them and
their gradients with a float64 autograd computation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from r2sweep.core.losses.softminmax_function import SoftMinMaxBuffers, SoftMinMaxFunction

__all__ = ["linf", "margin", "soft_min_max", "SoftMinMaxBuffers", "GRANULARITIES", "REDUCTIONS"]

GRANULARITIES = ("tensor", "channel")
REDUCTIONS = ("sum", "mean")


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid: choose one of {list(allowed)}")


def _channel_rows(w: Tensor) -> Tensor:
    """A (output channels, rest) view: the rows that per-row reductions run over."""
    if w.dim() == 0:
        raise ValueError("R2-Loss needs a weight tensor with at least one dimension, got a scalar")
    return w.reshape(w.shape[0], -1)


def _gradient_at(flat_index: Tensor, values: Tensor, like: Tensor, sparse: bool) -> Tensor:
    """A gradient shaped like ``like`` that is zero except ``values`` at ``flat_index``.

    ``flat_index`` must be sorted and free of repeats (a coalesced sparse tensor).
    """
    if sparse:
        index = torch.stack(torch.unravel_index(flat_index, like.shape))
        return torch.sparse_coo_tensor(
            index, values, like.shape, is_coalesced=True, check_invariants=False
        )
    dense = torch.zeros_like(like)
    dense.view(-1).index_put_((flat_index,), values)
    return dense


class _LinfFunction(torch.autograd.Function):
    """max|w| per tensor (or per output channel); the gradient reaches the arg-max only."""

    @staticmethod
    def forward(ctx, w: Tensor, per_channel: bool, sparse_grad: bool) -> Tensor:  # type: ignore[override]
        rows = _channel_rows(w)
        # Two fast vectorised reductions instead of one pass that allocates |W|.
        row_max, row_min = rows.amax(1), rows.amin(1)
        row_abs = torch.maximum(row_max, -row_min)
        ctx.save_for_backward(w, row_max, row_min, row_abs)
        ctx.per_channel, ctx.sparse_grad = per_channel, sparse_grad
        return row_abs if per_channel else row_abs.max()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        w, row_max, row_min, row_abs = ctx.saved_tensors
        rows = _channel_rows(w)
        if ctx.per_channel:
            which = torch.arange(rows.shape[0], device=w.device)
            grads = grad_out
        else:
            which = row_abs.argmax().view(1)
            grads = grad_out.view(1)
        # Only the rows holding the extreme are searched for its column.
        candidates = rows.index_select(0, which)
        positive = (row_max >= -row_min).index_select(0, which)
        column = torch.where(positive.unsqueeze(1), candidates, -candidates).argmax(1)
        sign = positive.to(w.dtype) * 2 - 1
        flat = which * rows.shape[1] + column
        return _gradient_at(flat, grads * sign, w, ctx.sparse_grad), None, None


class _MarginFunction(torch.autograd.Function):
    """M^2 + reduce_i max(|w_i| - |M|, 0) per tensor (or per output channel)."""

    @staticmethod
    def forward(ctx, w, m, mean: bool, per_channel: bool, sparse_grad: bool):  # type: ignore[override]
        rows = _channel_rows(w)
        n_rows, row_len = rows.shape
        threshold = m.detach().abs().expand(n_rows) if m.dim() == 0 else m.detach().abs()
        # Cheap screen: only rows whose extremes cross the margin can hold outliers.
        crossing = (rows.amax(1) > threshold) | (rows.amin(1) < -threshold)
        outlier_rows = crossing.nonzero().squeeze(1)
        hinge_rows = w.new_zeros(n_rows)
        count_rows = w.new_zeros(n_rows)
        flat = torch.empty(0, dtype=torch.long, device=w.device)
        signs = w.new_empty(0)
        if outlier_rows.numel():
            sub = rows.index_select(0, outlier_rows)
            excess = (sub.abs() - threshold.index_select(0, outlier_rows).unsqueeze(1)).clamp_(min=0)
            hinge_rows.index_add_(0, outlier_rows, excess.sum(1))
            where = excess.nonzero()
            count_rows.index_add_(
                0, outlier_rows, torch.bincount(where[:, 0], minlength=len(outlier_rows)).to(w.dtype)
            )
            flat = outlier_rows.index_select(0, where[:, 0]) * row_len + where[:, 1]
            signs = torch.sign(sub[where[:, 0], where[:, 1]])
        hinge = hinge_rows if per_channel else hinge_rows.sum()
        count = count_rows if per_channel else count_rows.sum()
        group_size = row_len if per_channel else w.numel()
        if mean:
            hinge = hinge / group_size
        ctx.save_for_backward(w, m, count, flat, signs)
        ctx.mean, ctx.per_channel, ctx.sparse_grad = mean, per_channel, sparse_grad
        ctx.group_size, ctx.row_len = group_size, row_len
        return m * m + hinge

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w, m, count, flat, signs = ctx.saved_tensors
        scale = grad_out / ctx.group_size if ctx.mean else grad_out
        grad_m = 2 * m * grad_out - torch.sign(m) * count * scale
        grad_w = None
        if ctx.needs_input_grad[0] and flat.numel():
            per_weight = scale.index_select(0, flat // ctx.row_len) if ctx.per_channel else scale
            grad_w = _gradient_at(flat, signs * per_weight, w, ctx.sparse_grad)
        return grad_w, grad_m, None, None, None


def linf(w: Tensor, *, granularity: str = "tensor", sparse_grad: bool = False) -> Tensor:
    """L-inf R2: ``max_i |w_i|`` (R2LOSS.md 2.1).

    Args:
        w: a weight tensor (at least one dimension).
        granularity: ``"tensor"`` for one value, ``"channel"`` for one per output channel.
        sparse_grad: return the gradient (non-zero at the arg-max only) as a sparse
            tensor. Cheap when ``w`` also receives a dense gradient from another loss;
            leave False when this is the only loss on ``w``.

    Returns:
        A scalar, or a vector of ``w.shape[0]`` values for ``granularity="channel"``.
    """
    _check("granularity", granularity, GRANULARITIES)
    return _LinfFunction.apply(w, granularity == "channel", sparse_grad)


def margin(
    w: Tensor,
    m: Tensor,
    reduction: str = "sum",
    *,
    granularity: str = "tensor",
    sparse_grad: bool = False,
) -> Tensor:
    """Margin R2: ``M^2 + reduce_i max(|w_i| - |M|, 0)`` (R2LOSS.md 2.2).

    Args:
        w: a weight tensor.
        m: the learnable margin: a scalar, or one per output channel for
            ``granularity="channel"``.
        reduction: ``"sum"`` or ``"mean"`` of the hinge over the group's weights.
        granularity: ``"tensor"`` or ``"channel"``.
        sparse_grad: as in :func:`linf` (the gradient reaches only weights outside ``|M|``).
    """
    _check("reduction", reduction, REDUCTIONS)
    _check("granularity", granularity, GRANULARITIES)
    per_channel = granularity == "channel"
    expected = (w.shape[0],) if per_channel else ()
    if tuple(m.shape) != expected:
        raise ValueError(f"margin m has shape {tuple(m.shape)}; granularity={granularity!r} needs {expected}")
    return _MarginFunction.apply(w, m, reduction == "mean", per_channel, sparse_grad)


def soft_min_max(
    w: Tensor,
    alpha: Tensor,
    eta: float = 1.0,
    *,
    granularity: str = "tensor",
    buffers: SoftMinMaxBuffers | None = None,
) -> Tensor:
    """Soft-Min-Max R2: ``smax(W) - smin(W) + eta * exp(-alpha)`` (R2LOSS.md 2.3).

    ``smax(W) = sum_i w_i softmax(alpha W)_i`` and ``smin`` the same with ``-alpha``.

    Args:
        w: a weight tensor.
        alpha: the temperature itself (positive): a scalar, or one per output channel.
        eta: weight of the ``exp(-alpha)`` term that keeps alpha from collapsing.
        granularity: ``"tensor"`` or ``"channel"``.
        buffers: work buffers to reuse across calls (see :class:`SoftMinMaxBuffers`).
    """
    _check("granularity", granularity, GRANULARITIES)
    per_channel = granularity == "channel"
    expected = (w.shape[0],) if per_channel else ()
    if tuple(alpha.shape) != expected:
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}; granularity={granularity!r} needs {expected}")
    spread = SoftMinMaxFunction.apply(w, alpha, per_channel, buffers or SoftMinMaxBuffers())
    return spread + eta * torch.exp(-alpha)

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
* Soft-Min-Max's gradient is dense; the values it needs are computed in place into
  buffers the caller may keep across steps (:class:`SoftMinMaxBuffers`).

Values are exact (the same formulas, no approximation); the tests compare them and
their gradients with a float64 autograd computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["linf", "margin", "soft_min_max", "SoftMinMaxBuffers", "GRANULARITIES", "REDUCTIONS"]

GRANULARITIES = ("tensor", "channel")
REDUCTIONS = ("sum", "mean")


# Beyond this exponent gap exp(-gap) leaves float32's normal range (1e-35 at 80).
_MAX_EXPONENT_GAP = 80.0


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


class _SoftMinMaxFunction(torch.autograd.Function):
    """smax(W) - smin(W) per tensor (or per channel) with softmax-weighted extremes.

    With p = softmax(alpha w) and q = softmax(-alpha w) over a group:
    d smax/dw = p (1 + alpha (w - smax)),  d smax/dalpha = Var_p(w),
    d smin/dw = q (1 - alpha (w - smin)),  d smin/dalpha = -Var_q(w).

    Both sides share one formula with a signed temperature, ``s a`` with s = +1 for the
    max and -1 for the min, and their unnormalised weights ``e = exp(s a (w - extreme))``
    share one (rows, 2, K) buffer (side 0 the max, side 1 the min): the forward's four
    sums are one ``sum`` and one matrix-vector product. With one row on the CPU (the
    per-tensor default) every per-row constant is a Python float (see
    :func:`_row_constants`).
    """

    @staticmethod
    def forward(ctx, w, alpha, per_channel: bool, buffers):  # type: ignore[override]
        rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        n_rows, row_len = rows.shape
        scalars = n_rows == 1 and rows.device.type == "cpu"
        weights = buffers.get("weights", rows, (n_rows, 2, row_len))
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
        soft = dots / sums  # (rows, 2): smax, smin
        ctx.save_for_backward(w, alpha, weights, sums, soft)
        ctx.per_channel, ctx.buffers = per_channel, buffers
        value = soft[:, 0] - soft[:, 1]
        return value if per_channel else value.reshape(())

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w, alpha, weights, sums, soft = ctx.saved_tensors
        rows = w.reshape(w.shape[0], -1) if ctx.per_channel else w.reshape(1, -1)
        n_rows = rows.shape[0]
        scalars = n_rows == 1 and rows.device.type == "cpu"
        a = alpha.detach().reshape(-1, 1)
        g = grad_out.reshape(-1, 1)
        signed_a = torch.cat((a, -a), 1)  # (rows, 2)
        scale = torch.cat((g, -g), 1) / sums  # grad = g (term_max / S_max - term_min / S_min)
        deviation = ctx.buffers.get_scratch("deviation", rows)
        terms = ctx.buffers.get_scratch("terms", weights)
        want_alpha = ctx.needs_input_grad[1]
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
        grad_alpha = None
        if want_alpha:
            variances = (centred[0] / sums[:, :1] + centred[1] / sums[:, 1:]) / (a * a)
            grad_alpha = (g * variances).reshape(alpha.shape)
        # ``grad`` is a fresh tensor, not a kept buffer: autograd can then add the task
        # gradient into it in place instead of allocating the sum.
        if scalars:
            scale_max, scale_min = _row_constants(scale, True)
            grad = torch.mul(terms[:, 0], scale_max).add_(terms[:, 1], alpha=scale_min)
        else:
            grad = torch.matmul(scale.unsqueeze(1), terms)  # (rows, 1, K)
        return grad.view(w.shape), grad_alpha, None, None


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
    spread = _SoftMinMaxFunction.apply(w, alpha, per_channel, buffers or SoftMinMaxBuffers())
    return spread + eta * torch.exp(-alpha)

"""AdaRound: learn, per weight, whether to round up or down (Nagel et al. 2020).

Round-to-nearest minimizes each weight's own error, not the layer's output
error; at 2 bits the difference decides whether a network works. AdaRound
keeps the grid (scale and zero point) of round-to-nearest and learns one
continuous variable ``V`` per weight:

    W_soft = grid(clamp(floor(W / s) + h(V), qmin, qmax))
    h(V)   = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)    (rectified sigmoid)

minimizing ``||f(W_soft; x) - target||^2 / ||target||^2 + lambda_r * sum(1 - |2 h(V) - 1|^beta)``
over calibration inputs ``x``. The regularizer pushes every ``h`` to 0 or 1;
``beta`` is annealed from 20 to 2 after a warm-up without it, so rounding
decisions may move early and must settle late. Finally each weight is rounded
hard: ``floor + [V >= 0]``.

The grid is written as ``value(q) = base + step * q`` for ``q`` in ``[qmin, qmax]``,
which covers the uniform grids of :mod:`r2sweep.core.quant.fake` (``base = -s z``,
``step = s``) and the 1-bit ``{-s, +s}`` grid (``base = -s``, ``step = 2 s``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from r2sweep.core.quant.fake import QuantSpec, _safe_scale, qrange, weight_qparams
from r2sweep.core.graph import CONV_TYPES
from r2sweep.core.validate import check, is_number, require_int

__all__ = [
    "GAMMA",
    "ZETA",
    "AdaRoundSettings",
    "AdaRoundWeight",
    "Grid",
    "adaround_layer",
    "reconstruction_error",
    "rectified_sigmoid",
    "weight_grid",
]

# Stretch of the rectified sigmoid: h reaches exactly 0 and 1 at finite V, so
# the regularizer can drive weights to a hard decision.
ZETA = 1.1
GAMMA = -0.1


@dataclass(frozen=True)
class Grid:
    """The levels ``base + step * q``, ``q`` an integer in ``[qmin, qmax]`` (tensors broadcast against the weight)."""

    base: Tensor
    step: Tensor
    qmin: int
    qmax: int

    def coords(self, w: Tensor) -> Tensor:
        """``w`` in grid units (integers land on levels)."""
        return (w - self.base) / self.step

    def value(self, q: Tensor) -> Tensor:
        return self.base + self.step * torch.clamp(q, self.qmin, self.qmax)

    def round_to_nearest(self, w: Tensor) -> Tensor:
        return self.value(torch.round(self.coords(w)))


def weight_grid(w: Tensor, spec: QuantSpec) -> Grid:
    """The round-to-nearest grid of ``w`` under ``spec`` (its scale from ``spec.range``)."""
    scale, zero_point = weight_qparams(w, spec)
    scale = _safe_scale(scale)
    if spec.binary:
        return Grid(base=-scale, step=2 * scale, qmin=0, qmax=1)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    return Grid(base=-scale * zero_point, step=scale, qmin=qmin, qmax=qmax)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V)``: a sigmoid stretched to (gamma, zeta) and clipped to [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    # V with h(V) = h for h in [0, 1): the soft weight starts exactly at W.
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


class AdaRoundWeight(nn.Module):
    """The soft-rounded version of one weight tensor, with the learnable ``V``."""

    def __init__(self, weight: Tensor, grid: Grid) -> None:
        super().__init__()
        self.grid = grid
        coords = grid.coords(weight.detach())
        self.register_buffer("floor", torch.floor(coords))
        self.v = nn.Parameter(_inverse_rectified_sigmoid(coords - self.floor))

    def soft(self) -> Tensor:
        return self.grid.value(self.floor + rectified_sigmoid(self.v))

    @torch.no_grad()
    def hard(self) -> Tensor:
        return self.grid.value(self.floor + (self.v >= 0).to(self.floor.dtype))

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: zero only when every ``h`` is 0 or 1."""
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class AdaRoundSettings:
    """Optimization knobs (defaults: the AdaRound paper's, fewer iterations and a larger lr;
    docs/reference.md, "Downstream methods and their defaults")."""

    iterations: int = 1000
    batch_size: int = 32
    # The paper's 1e-3 is for 10-20k iterations. At 1000, Adam at 1e-3 moves a rounding
    # variable by about 1, too little to decide one that starts near the middle: hundreds
    # stay undecided and round by chance, and whole models lose up to 12 points at W2
    # (benchmarks/RESULTS.md, "Block reconstruction"). 1e-2 converges in 500-1000.
    lr: float = 1e-2
    lambda_r: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        require_int("downstream.adaround_iters", self.iterations, 1)
        require_int("downstream.adaround_batch_size", self.batch_size, 1)
        check(is_number(self.lr) and self.lr > 0, "downstream.adaround_lr", self.lr, "a number > 0")
        check(is_number(self.lambda_r) and self.lambda_r >= 0, "downstream.adaround_lambda", self.lambda_r, "a number >= 0")
        check(is_number(self.warmup) and 0 <= self.warmup < 1, "downstream.adaround_warmup", self.warmup, "a number in [0, 1)")

    def beta(self, iteration: int) -> float | None:
        """The annealed beta at ``iteration``; None during the warm-up (no regularizer)."""
        start = int(self.warmup * self.iterations)
        if iteration < start:
            return None
        progress = (iteration - start) / max(1, self.iterations - 1 - start)
        return self.beta_end + (self.beta_start - self.beta_end) * (1 - progress)


def _layer_output(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(layer, CONV_TYPES):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def reconstruction_error(output: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over features (dim 1), averaged over samples and positions."""
    return (output - target).pow(2).sum(dim=1).mean()


def adaround_layer(
    layer: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    spec: QuantSpec,
    settings: AdaRoundSettings,
    after: nn.Module | None = None,
) -> Tensor:
    """Learn the rounding of ``layer``'s weight so that ``layer(inputs)`` matches ``targets``.

    Args:
        layer: a Conv1d/2d/3d or Linear (not modified; its bias stays in float).
        inputs: calibration inputs of the layer, ``(N, ...)``.
        targets: what the layer should output for them (the float network's
            output at this layer), same leading ``N``.
        spec: the weight quantizer; its grid is kept, only the rounding is learned.
        after: a module applied to the layer's output before comparing it with
            ``targets`` (an unfolded BatchNorm in eval mode): the error that
            matters is after BN's per-channel rescaling, which can weigh a channel
            by orders of magnitude more than another.

    Returns:
        The hard-rounded weight (same shape as ``layer.weight``, on its grid).
    """
    weight = layer.weight.detach()
    soft = AdaRoundWeight(weight, weight_grid(weight, spec))
    optimizer = torch.optim.Adam(soft.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    count = inputs.shape[0]
    batch = min(settings.batch_size, count)
    # The reconstruction error is taken relative to the targets' energy, so that
    # lambda_r weighs it the same whatever the layer's output scale: with an
    # absolute error, a layer with small outputs (before an amplifying BN) lets
    # the regularizer decide alone, and one with large outputs never lets it
    # force the rounding decisions, so the final hard rounding is just RTN.
    energy = reconstruction_error(torch.zeros_like(targets[:1]), targets).clamp(min=1e-12)
    with torch.enable_grad():
        for iteration in range(settings.iterations):
            index = torch.randint(count, (batch,), generator=generator).to(inputs.device)
            output = _layer_output(layer, inputs[index], soft.soft())
            if after is not None:
                output = after(output)
            loss = reconstruction_error(output, targets[index]) / energy
            beta = settings.beta(iteration)
            if beta is not None and settings.lambda_r > 0:
                loss = loss + settings.lambda_r * soft.regularizer(beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return soft.hard()

"""DKM: differentiable k-means weight clustering (Cho et al. 2022; R2LOSS spec 3.3).

Palettization stores a layer as a lookup table of ``k = 2^b`` centroids plus one
``b``-bit index per weight (per vector of ``cluster_dim`` weights). Hard k-means has
no useful gradient: moving a weight slightly never changes which centroid it is
snapped to. DKM makes the assignment soft so the task loss can move weights
across cluster boundaries and the centroids with them. Per layer, with ``x_i``
the weight vectors and ``c_j`` the centroids, it repeats a few times::

    D_ij = ||x_i - c_j||^2
    A    = softmax(-D / tau) over j
    c_j  = sum_i A_ij x_i / sum_i A_ij

and the layer computes with ``W_tilde = A C``. Gradients flow through the whole
loop back to the weights. At evaluation each vector is replaced by its nearest
centroid (:meth:`DkmClusterer.hard`), which is what an exported model stores.

``tau`` is relative to the layer's scale. ``D`` is in squared-weight units, so an
absolute temperature means different softness for layers with different ranges.
R2-Loss shrinks ranges, so an absolute tau would cluster an R2 model more softly
than the baseline it is compared with. Here the temperature actually used is
``tau * s``, with ``s`` the layer's mean squared distance from its mean vector
(its variance, for ``cluster_dim = 1``). ``s`` is measured on the weight the
clusterer first sees and is then kept fixed, like DKM's fixed tau.

Cost: every iteration builds ``N x k`` distances and assignments (``N = numel /
cluster_dim``), plus an ``N x k x cluster_dim`` difference. Autograd keeps a few of
these per iteration for the backward pass, so a training step holds about
``3 * iterations * N * k * cluster_dim`` floats per layer. Nothing is ``O(N^2)``.
That is small at 1-2 bits. At ``k = 256`` a layer of 2.4 M weights (a
ResNet-18 3x3 512x512 conv) needs gigabytes. :meth:`DkmClusterer.hard`
and :meth:`DkmClusterer.palettize` run in bounded-size chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from r2sweep.core.precision import full_precision
from r2sweep.core.validate import check, is_number, require_int

__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_TAU",
    "DkmClusterer",
]

#: Temperature relative to the layer's variance. At 1 bit on a Gaussian layer
#: (centroids ~1.6 std apart), only weights within ~0.05 std of the boundary get
#: a mixed assignment. Those still receive gradient, and the soft weight the model
#: trains with stays close to the hard one it is evaluated with. 1-bit small-CNN
#: fine-tune on digits (46-92 steps): tau 0.2 / 0.05 / 0.01 gave 96-99 / 97-97.5 / 93-94%
#: top-1. coremltools' absolute default (1e-4) is 0.02-0.06 of this scale there.
DEFAULT_TAU = 0.05
#: DKM iterations per forward. The centroids warm-start from the previous
#: step, so a few iterations are enough (coremltools also uses 3).
DEFAULT_ITERATIONS = 3

# Hard k-means (Lloyd) steps that refine the initial centroids on first use.
_INIT_LLOYD_STEPS = 10
# Fixed seed of the k-means++ initialisation (cluster_dim > 1). The same weight
# always gives the same palette, whatever the global RNG holds.
_INIT_SEED = 0
# Elements (vectors x centroids) that hard assignment processes at once. This
# bounds its memory at ~64 MiB of float32 whatever the layer size.
_ASSIGN_CHUNK_ELEMENTS = 1 << 24


def _vectors(w: Tensor, cluster_dim: int) -> Tensor:
    """``w`` as ``(N, cluster_dim)``: consecutive elements of its row-major flattening.

    Raises:
        ConfigError: ``w.numel()`` is not a multiple of ``cluster_dim``.
    """
    if not torch.is_floating_point(w):
        raise TypeError(f"DKM clusters floating-point weights, got dtype {w.dtype}")
    numel = w.numel()
    if numel == 0:
        raise ValueError("DKM cannot cluster an empty weight tensor")
    # Padding would put made-up values into the centroid means, so refuse instead.
    check(
        numel % cluster_dim == 0,
        "downstream.cluster_dim",
        cluster_dim,
        f"a divisor of the layer's number of weights ({numel}, shape {tuple(w.shape)})",
    )
    return w.reshape(-1, cluster_dim)


def _sq_distances(x: Tensor, c: Tensor) -> Tensor:
    """``(N, k)`` squared distances from the rows of ``x`` to those of ``c``.

    The exact difference is used rather than ``|x|^2 - 2 x.c + |c|^2``, which loses
    the small distances to cancellation in float32.
    """
    return (x[:, None, :] - c[None, :, :]).pow(2).sum(dim=2)


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centroid of every row of ``x`` (ties: lowest index), in chunks."""
    chunk = max(1, _ASSIGN_CHUNK_ELEMENTS // (c.shape[0] * c.shape[1]))
    return torch.cat([_sq_distances(x[i : i + chunk], c).argmin(dim=1) for i in range(0, x.shape[0], chunk)])


def _lloyd(x: Tensor, c: Tensor, steps: int) -> Tensor:
    """``steps`` hard k-means updates of ``c``. A centroid left empty keeps its place."""
    for _ in range(steps):
        index = _nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, index, x)
        counts = torch.zeros(c.shape[0], dtype=x.dtype, device=x.device).index_add_(
            0, index, torch.ones_like(x[:, 0])
        )
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
    return c


def _quantile_init(x: Tensor, k: int) -> Tensor:
    """1-D: the ``(j + 1/2) / k`` quantiles of the values, ``j = 0..k-1``."""
    values = x[:, 0].sort().values
    # Indexing into the sorted values rather than torch.quantile, which refuses
    # more than 16 M elements.
    position = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * values.numel()).long()
    return values[position.clamp(max=values.numel() - 1).to(values.device)][:, None]


def _kmeans_pp_init(x: Tensor, k: int) -> Tensor:
    """k-means++ seeding with a fixed-seed generator, so it is deterministic.

    Once every distinct vector is a centroid, all distances are zero. The
    remaining centroids then repeat the first one.
    """
    generator = torch.Generator(device="cpu").manual_seed(_INIT_SEED)
    xs = x.detach().to("cpu", torch.float64)
    chosen = [int(torch.randint(xs.shape[0], (1,), generator=generator))]
    nearest = _sq_distances(xs, xs[chosen[0]][None])[:, 0]
    while len(chosen) < k:
        total = float(nearest.sum())
        if total <= 0:
            chosen.append(chosen[0])
            continue
        pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, _sq_distances(xs, xs[pick][None])[:, 0])
    return x[torch.tensor(chosen, device=x.device)]


class DkmClusterer(nn.Module):
    """Clusters one weight tensor into ``2^bits`` centroids, softly (DKM) or hard.

    * :meth:`soft` is the training path. It runs ``iterations`` differentiable
      k-means steps and returns ``A C`` with the shape of ``w``. The final
      centroids are stored, detached, to warm-start the next call.
    * :meth:`hard` is the evaluation and export path. Each vector becomes its
      nearest stored centroid, so there are at most ``2^bits`` distinct values
      (``cluster_dim = 1``) or rows (``cluster_dim > 1``). No gradient reaches ``w``.
    * :meth:`palettize` returns the lookup table and indices behind :meth:`hard`.
    * ``forward`` calls :meth:`soft` in training mode and :meth:`hard` in
      eval mode, as ``BatchNorm`` switches on ``module.training``. Used as a
      ``torch.nn.utils.parametrize`` parametrization of a layer's ``weight``,
      ``model.eval()`` therefore evaluates the palettized model.

    The centroids and the temperature scale are set on the first call from the
    weight it sees (so load pre-trained weights first). They are buffers, so they
    travel with ``state_dict``. The initial centroids are evenly spaced quantiles
    (``cluster_dim = 1``) or a fixed-seed k-means++ draw, refined by a few hard
    k-means steps, and so do not depend on the global RNG. A layer with fewer
    distinct values than ``k`` gets repeated centroids. Those stay identical
    (they receive identical updates), which is harmless; :meth:`reset`
    re-initialises from the current weight.

    Vectors are consecutive elements of the row-major flattened weight (for a
    conv, along the kernel width, then input channels); permute the weight
    before clustering for another grouping.

    Args:
        bits: ``k = 2^bits`` centroids per layer, 1 to 8.
        tau: softmax temperature relative to the layer's variance, > 0. Smaller
            is harder: at ``tau -> 0`` :meth:`soft` equals :meth:`hard`.
        iterations: soft k-means steps per call, >= 1.
        cluster_dim: weights per clustered vector, >= 1. The layer then stores
            ``bits / cluster_dim`` bits per weight plus the table.

    Raises:
        ConfigError: an invalid argument; the message names ``downstream.weight_bits``,
            ``downstream.tau``, ``downstream.dkm_iters`` or ``downstream.cluster_dim``.
    """

    centroids: Tensor
    scale: Tensor
    initialized: Tensor

    def __init__(
        self,
        bits: int,
        tau: float = DEFAULT_TAU,
        iterations: int = DEFAULT_ITERATIONS,
        cluster_dim: int = 1,
    ) -> None:
        super().__init__()
        self.bits = require_int("downstream.weight_bits", bits, 1, maximum=8)
        check(is_number(tau) and tau > 0, "downstream.tau", tau, "a number > 0")
        self.tau = float(tau)
        self.iterations = require_int("downstream.dkm_iters", iterations, 1)
        self.cluster_dim = require_int("downstream.cluster_dim", cluster_dim, 1)
        self.num_clusters = 2**self.bits
        # Buffers, so a checkpoint resumes with the same palette and temperature.
        self.register_buffer("centroids", torch.zeros(self.num_clusters, self.cluster_dim))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._hard_cache: tuple[tuple, Tensor] | None = None

    # --- state ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the centroids and scale; the next call re-initialises them from its weight."""
        self.centroids.zero_()
        self.scale.fill_(1.0)
        self.initialized.fill_(False)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        x = x.detach()
        if self.cluster_dim == 1:
            c = _quantile_init(x, self.num_clusters)
        else:
            c = _kmeans_pp_init(x, self.num_clusters)
        c = _lloyd(x, c, _INIT_LLOYD_STEPS)
        self.centroids.copy_(c)
        # Mean squared distance to the mean vector: the variance when cluster_dim = 1.
        spread = (x - x.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean()
        # A constant layer has spread 0. Any positive scale then gives the same
        # (exact) clustering, and 1 avoids a zero temperature.
        self.scale.copy_(torch.where(spread > 0, spread, torch.ones_like(spread)))
        self.initialized.fill_(True)

    def _prepare(self, w: Tensor) -> Tensor:
        x = _vectors(w, self.cluster_dim)
        if not bool(self.initialized):
            self._initialize(x)
        return x

    # --- clustering -------------------------------------------------------------

    @property
    def temperature(self) -> float:
        """The absolute temperature ``tau * scale`` used in the softmax (after initialisation)."""
        return self.tau * float(self.scale)

    def soft(self, w: Tensor) -> Tensor:
        """The DKM soft-clustered weight ``A C``, shaped like ``w`` (training path).

        Differentiable with respect to ``w`` through every iteration. Updates the
        stored centroids (detached) to this call's final ``C``.

        Raises:
            ConfigError: ``w.numel()`` is not a multiple of ``cluster_dim``.
        """
        x = self._prepare(w)
        # A copy: the buffer is overwritten below and must not be part of the graph.
        c = self.centroids.to(x, copy=True)
        # Clamped, so a tiny scale times a small tau never underflows to a zero temperature.
        tau_abs = (self.tau * self.scale.to(x)).clamp(min=torch.finfo(x.dtype).tiny)
        # Below this mass a centroid has no members. Dividing by it would give a
        # NaN or wild centroid, so it keeps its place instead.
        empty = torch.finfo(x.dtype).eps
        a = x.new_empty(0)
        for _ in range(self.iterations):
            d = _sq_distances(x, c)
            # Subtracting each row's minimum leaves the softmax unchanged, but the
            # nearest centroid always gets logit 0. Without it a row whose distances
            # all overflow to -inf would give NaN.
            logits = -(d - d.detach().amin(dim=1, keepdim=True)) / tau_abs
            a = torch.softmax(logits, dim=1)
            mass = a.sum(dim=0)
            updated = (a.t() @ x) / torch.where(mass > empty, mass, torch.ones_like(mass))[:, None]
            c = torch.where((mass > empty)[:, None], updated, c)
        with torch.no_grad():
            self.centroids.copy_(c.detach())
        return (a @ c).reshape(w.shape)

    @torch.no_grad()
    def palettize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The lookup table and indices of ``w`` under the stored centroids (export path).

        Returns:
            ``(centroids, indices)``: ``(2^bits, cluster_dim)`` values in ``w``'s
            dtype, and ``(numel / cluster_dim,)`` int64 indices into them, so that
            ``centroids[indices].reshape(w.shape)`` equals :meth:`hard` of ``w``.

        Raises:
            ConfigError: ``w.numel()`` is not a multiple of ``cluster_dim``.
        """
        x = self._prepare(w)
        c = self.centroids.to(x)
        return c, _nearest(x, c)

    def hard(self, w: Tensor) -> Tensor:
        """``w`` with every vector replaced by its nearest stored centroid (evaluation path).

        At most ``2^bits`` distinct values (``cluster_dim = 1``) or distinct
        ``cluster_dim``-vectors. Not differentiable with respect to ``w``.

        Raises:
            ConfigError: ``w.numel()`` is not a multiple of ``cluster_dim``.
        """
        centroids, indices = self.palettize(w)
        return centroids[indices].reshape(w.shape)

    def forward(self, w: Tensor) -> Tensor:
        """:meth:`soft` in training mode, :meth:`hard` in eval mode.

        Always in float32 (autocast off): under autocast the ``A^T X`` and ``A C``
        matmuls would run in bf16/fp16 and the stored centroids drift by its rounding.
        The layer's own conv/linear still runs at the forward's precision.
        """
        with full_precision(w):
            if self.training:
                return self.soft(w)
            # Evaluation calls this once per batch with the same weight: the hard assignment
            # (every weight's nearest centroid) is computed once per weight and palette. Any
            # in-place change (an optimizer step, load_state_dict) bumps the version; a
            # write through ``.data`` would not, and r2sweep makes none.
            if self._hard_cache is None or self._hard_cache[0] != self._hard_key(w):
                hard = self.hard(w)  # may initialize the palette first: the key is taken after
                self._hard_cache = (self._hard_key(w), hard)
            return self._hard_cache[1]

    def _hard_key(self, w: Tensor) -> tuple:
        return (w.data_ptr(), w._version, w.shape, w.dtype, self.centroids.data_ptr(), self.centroids._version)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, tau={self.tau}, iterations={self.iterations}, cluster_dim={self.cluster_dim}"

"""``distorted_digits``: scikit-learn's digits re-rendered larger and made hard, deterministically.

Plain digits is too easy to show R2-Loss at work: small models keep 98% at 2
and even 1 bit once BN is re-estimated, so quantization has nothing to lose.
This dataset keeps digits' ten labels and its 1797 real handwritten sources
(no download) and renders each source several times at ``size`` x ``size``
with what makes a digit hard to read:

* an affine warp: rotation, anisotropic scale, shear and translation;
* an elastic warp: a smooth random displacement field (stroke wobble);
* stroke intensity and blur varying per image;
* clutter: fragments of *other* digits of the same split pasted around the
  digit (strokes that look like parts of a digit, not random noise);
* a smooth uneven background and pixel noise.

Train and validation renders come from disjoint source images (a stratified
split of the 1797 sources), so validation measures generalisation to new
handwriting, not to new distortions of images seen in training. Everything
depends only on ``data_seed`` (default 0), not on the trial's seed: every
trial and every seed of a benchmark evaluates on the same validation set,
and the trial seed varies only the model's initialisation and data order.

What it is not: a natural-image benchmark. It makes models lose accuracy when
quantized to 1-2 bits (less margin between classes) at laptop cost; whether
an effect measured here carries over to ImageNet is what the paper's numbers,
not this dataset, show.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from r2sweep.core.data.digits import digits_arrays
from r2sweep.core.data.registry import DataSplits, register_dataset, stratified_split
from r2sweep.core.errors import ConfigError
from r2sweep.core.validate import require_int

__all__ = ["make_distorted_digits", "render_digits", "source_split"]

_DEFAULT_VAL_FRACTION = 0.2
# Rendering is done in chunks so memory stays flat for any number of variants.
_CHUNK = 2048


def _affine(count: int, gen: torch.Generator, severity: float) -> Tensor:
    """``count`` random 2x3 affine matrices mapping output to source coordinates in [-1, 1]."""
    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(count, generator=gen)

    angle = uniform(-0.5, 0.5) * severity  # radians, +-29 degrees at severity 1
    # The source is 8x8 on a square canvas; a zoom > 1 shrinks the digit so that
    # clutter and translation have room around it.
    zoom_x = uniform(1.15, 1.6) ** (0.5 + 0.5 * severity)
    zoom_y = zoom_x * uniform(0.85, 1.15)
    shear = uniform(-0.35, 0.35) * severity
    shift = torch.stack([uniform(-0.3, 0.3), uniform(-0.3, 0.3)], dim=1) * severity
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shearing = torch.eye(2).repeat(count, 1, 1)
    shearing[:, 0, 1] = shear
    scaling = torch.diag_embed(torch.stack([zoom_x, zoom_y], dim=1))
    linear = rotation @ shearing @ scaling
    return torch.cat([linear, shift.unsqueeze(2)], dim=2)


def _smooth_field(count: int, channels: int, size: int, coarse: int, gen: torch.Generator) -> Tensor:
    """Smooth random fields: Gaussian noise on a ``coarse`` grid, bicubically upsampled."""
    noise = torch.randn((count, channels, coarse, coarse), generator=gen)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)


def _warp(sources: Tensor, size: int, gen: torch.Generator, severity: float, elastic: float) -> Tensor:
    """Render ``sources`` (N, 1, 8, 8) at ``size`` through a random affine and elastic warp."""
    count = sources.shape[0]
    grid = F.affine_grid(_affine(count, gen, severity), [count, 1, size, size], align_corners=False)
    displacement = _smooth_field(count, 2, size, 4, gen).permute(0, 2, 3, 1)
    grid = grid + elastic * displacement
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Per-image Gaussian blur (3x3 kernel) of strength ``sigma`` (0: none)."""
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    weights = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)  # (N, 3)
    count = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    rows = sum(weights[:, i].view(count, 1, 1, 1) * padded[:, :, i : i + images.shape[2], :] for i in range(3))
    return sum(weights[:, i].view(count, 1, 1, 1) * rows[:, :, :, i : i + images.shape[3]] for i in range(3))


def render_digits(
    sources: Tensor,
    clutter_pool: Tensor,
    size: int,
    gen: torch.Generator,
    *,
    severity: float = 1.0,
    clutter: int = 2,
    noise: float = 0.15,
) -> Tensor:
    """Render each 8x8 source (N, 1, 8, 8), values in [0, 1], as one hard ``size`` x ``size`` image.

    ``clutter_pool`` holds the sources fragments are cut from (the same split's,
    so no validation stroke ever appears in training). ``severity`` scales the
    warps, the noise and the background, and below 1 the number of fragments.
    Returns (N, 1, size, size).
    """
    count = sources.shape[0]
    clutter = round(clutter * min(severity, 1.0))
    noise = noise * severity
    images = _warp(sources, size, gen, severity, elastic=0.06 * severity)
    images = images * (0.55 + 0.45 * torch.rand((count, 1, 1, 1), generator=gen))
    for _ in range(clutter):
        picks = torch.randint(len(clutter_pool), (count,), generator=gen)
        fragments = _warp(clutter_pool[picks], size, gen, severity=1.0, elastic=0.1)
        # Keep a random half-plane of each fragment: a stroke, not a whole digit.
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        theta = 2 * math.pi * torch.rand(count, generator=gen)
        offset = 0.6 * (torch.rand(count, generator=gen) - 0.5)
        side = (xs[None] * torch.cos(theta)[:, None, None] + ys[None] * torch.sin(theta)[:, None, None]) > offset[:, None, None]
        # Pushed away from the centre: clutter sits around the digit, not on it.
        away = torch.roll(fragments * side.unsqueeze(1), shifts=(size // 3, size // 3), dims=(2, 3))
        strength = 0.25 + 0.35 * torch.rand((count, 1, 1, 1), generator=gen)
        images = torch.maximum(images, strength * away)
    images = _blur(images, 0.8 * torch.rand(count, generator=gen))
    background = 0.12 * severity * _smooth_field(count, 1, size, 3, gen)
    images = images + background + noise * torch.randn(images.shape, generator=gen)
    return images.clamp(-0.5, 1.5)


def _render_split(sources: Tensor, size: int, variants: int, gen: torch.Generator, severity: float) -> Tensor:
    repeated = sources.repeat(variants, 1, 1, 1)
    chunks = [render_digits(repeated[i : i + _CHUNK], sources, size, gen, severity=severity)
              for i in range(0, len(repeated), _CHUNK)]
    return torch.cat(chunks)


def source_split(val_fraction: float | None, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into sklearn's 1797 digits: the training sources and the disjoint validation sources."""
    fraction = _DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    return stratified_split(digits_arrays()[1], fraction, data_seed)


@register_dataset("distorted_digits")
def make_distorted_digits(
    *,
    seed: int,
    root: str | None,
    val_fraction: float | None,
    size: int = 16,
    train_variants: int = 4,
    val_variants: int = 2,
    severity: float = 1.0,
    data_seed: int = 0,
) -> DataSplits:
    """Hard renders of sklearn's digits; train and validation from disjoint source images.

    Args:
        seed: the trial's seed; ignored (the data depend on ``data_seed`` only).
        root: ignored (the sources ship with scikit-learn).
        val_fraction: share of the 1797 source images held out, default 0.2 (360).
        size: side of the rendered images in pixels (8-64; 16 by default: enough
            room for the distortions, and cheap on a CPU).
        train_variants: renders per training source (4: 5748 images by default).
        val_variants: renders per validation source (2: 720 images; more renders
            make the accuracy less noisy).
        severity: scales every distortion (0: the digit upscaled and centred, 1: the
            default, 2: harder still).
        data_seed: fixes the split and every render.
    """
    del seed  # one dataset for every trial and seed, by design
    size = require_int("data.size", size, 8)
    if size > 64:
        raise ConfigError("data.size", size, "an integer from 8 to 64")
    train_variants = require_int("data.train_variants", train_variants, 1)
    val_variants = require_int("data.val_variants", val_variants, 1)
    data_seed = require_int("data.data_seed", data_seed, 0)
    if isinstance(severity, bool) or not isinstance(severity, Real) or not 0 <= severity <= 2:
        raise ConfigError("data.severity", severity, "a number from 0 to 2")
    pixels, targets = digits_arrays()
    sources = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(targets, dtype=torch.int64)
    train_idx, val_idx = source_split(val_fraction, data_seed)
    gen = torch.Generator().manual_seed(data_seed)
    train_x = _render_split(sources[train_idx], size, train_variants, gen, float(severity))
    val_x = _render_split(sources[val_idx], size, val_variants, gen, float(severity))
    train_y = labels[train_idx].repeat(train_variants)
    val_y = labels[val_idx].repeat(val_variants)
    mean, std = train_x.mean(), train_x.std()
    return DataSplits(
        train=TensorDataset((train_x - mean) / std, train_y),
        val=TensorDataset((val_x - mean) / std, val_y),
        num_classes=10,
        in_channels=1,
        input_size=size,
    )

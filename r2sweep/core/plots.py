"""Weight histograms that show at a glance what R2-Loss did to a model's ranges.

R2 exists to remove the few outlier weights that stretch a layer's range and so
waste most of a 1-2-bit grid. The plots therefore show the layers where that is
worst: the Conv/Linear layers with the largest ``max|w| / std`` (how many
standard deviations the farthest weight lies out), with log-scale counts so the
handful of outliers stays visible next to the bulk. Each subplot title gives
the layer, its ``max|w|`` and its excess kurtosis (0 for a Gaussian).

Figures are drawn on matplotlib's Agg canvas directly, without ``pyplot``: no
global backend switch, no display needed, nothing left open between calls (the
sweep calls this on a headless driver). No MLflow here; the tracker uploads the
PNG like any other file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from torch import nn

from r2sweep.core.losses import regularized_layers
from r2sweep.core.stats import excess_kurtosis

__all__ = ["weight_histograms", "compare_weight_histograms", "outlier_layers", "new_figure", "save_png"]

_DPI = 120
_COLUMNS = 2


#: What the figures draw: a model, or its Conv/Linear weights by layer name (a read-back ``pretrained.pt``'s
#: ``layers``, so a report draws them without building the model).
Weights = Union[nn.Module, Mapping[str, torch.Tensor]]


def _weights(source: Weights) -> dict[str, np.ndarray]:
    """Flattened float64 weights of every Conv/Linear layer, by module name."""
    layers = regularized_layers(source) if isinstance(source, nn.Module) else source.items()
    return {name: weight.detach().cpu().double().reshape(-1).numpy() for name, weight in layers}


def _outlier_score(w: np.ndarray) -> float:
    # max|w| / std: how far out the farthest weight lies. A constant layer has none.
    std = float(w.std()) if w.size > 1 else 0.0
    peak = float(np.abs(w).max()) if w.size else 0.0
    if std > 0:
        return peak / std
    return math.inf if peak > 0 and w.size > 1 else 0.0


def outlier_layers(model: Weights, count: int = 4) -> list[str]:
    """Names of the ``count`` Conv/Linear layers with the largest ``max|w| / std``, worst first."""
    return _ranked(_weights(model), count)


def _ranked(weights: Mapping[str, np.ndarray], count: int) -> list[str]:
    ranked = sorted(weights, key=lambda name: _outlier_score(weights[name]), reverse=True)
    return ranked[: max(count, 0)]


def _summary(w: np.ndarray) -> str:
    return f"max|w|={np.abs(w).max():.3g}, kurt={excess_kurtosis(torch.from_numpy(w)):.1f}"


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A figure on its own Agg canvas (inches), laid out so labels never overlap (``layout=None``:
    the caller places the axes itself)."""
    figure = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _grid(count: int, title: str, title_lines: int = 2) -> tuple[Figure, list]:
    """A grid of histogram axes with margins fixed in inches, sized for ``title_lines``-line axes titles.

    Not matplotlib's constrained layout: every trial draws one of these, and the
    layout pass was 40% of the figure's cost. The labels here are known in advance
    (tick labels, one x and one y label, a title of ``title_lines`` lines), so
    fixed margins fit them.
    """
    columns = min(_COLUMNS, count)
    rows = math.ceil(count / columns)
    cell_w, cell_h = 5.6, 3.6  # one axes with its labels, inches
    title_h = 0.12 + 0.16 * title_lines  # an axes title of 9 pt lines
    left, right, bottom, gap_x, gap_y = 0.75, 0.2, 0.55, 0.85, 0.55 + title_h
    top = 0.5 + title_h  # the figure's title above the first row's axes titles
    width = columns * cell_w
    height = rows * cell_h + top
    axes_w = (width - left - right - (columns - 1) * gap_x) / columns
    axes_h = (height - top - bottom - (rows - 1) * gap_y) / rows
    figure = new_figure(width, height, layout=None)
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height,
        "wspace": gap_x / axes_w, "hspace": gap_y / axes_h}).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    figure.suptitle(title, fontsize=12, y=1 - 0.15 / height, va="top")
    return figure, axes[:count]


def _label_axes(ax, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log scale)")
    ax.set_yscale("log")
    # Ticks on powers of ten only: minor labels ("9x10^1") crowd a small axis, and the
    # unlabelled minor ticks alone cost about 0.6 s a figure (every trial draws one).
    ax.yaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="major", alpha=0.3)


def save_png(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parents created); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target


def weight_histograms(
    model: Weights,
    path: str | os.PathLike[str],
    *,
    layers: int = 4,
    bins: int = 100,
    title: str | None = None,
) -> Path:
    """Write a PNG of weight histograms of the ``layers`` worst-outlier Conv/Linear layers.

    Dotted lines mark ``mean +- 3 std``: weights beyond them are the outliers that
    set the quantization range. Returns the path written.

    Raises:
        ValueError: the model has no Conv/Linear layer.
    """
    weights = _weights(model)
    names = _ranked(weights, layers)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear layer to plot")
    figure, axes = _grid(len(names), title or f"Weights of the {len(names)} layers with the largest max|w|/std")
    for ax, name in zip(axes, names):
        w = weights[name]
        ax.hist(w, bins=bins, histtype="stepfilled", color="tab:blue", alpha=0.8)
        mean, std = float(w.mean()), float(w.std())
        for edge in (mean - 3 * std, mean + 3 * std):
            ax.axvline(edge, color="0.35", linestyle=":", linewidth=1)
        _label_axes(ax, f"{name}  ({w.size} weights)\n{_summary(w)}")
    return save_png(figure, path)


def compare_weight_histograms(
    models: Mapping[str, Weights],
    path: str | os.PathLike[str],
    *,
    layers: int = 4,
    bins: int = 100,
    reference: str | None = None,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Overlay the weight histograms of several models (e.g. ``{"no R2": a, "R2": b}``) per layer.

    The layers are the worst outliers of ``reference`` (default: the first
    model), so the plot shows what happened to exactly those layers; each layer
    uses one set of bins for all models. A model lacking a layer is left out of
    that subplot. ``colors`` maps a label to a matplotlib colour (default: the
    colour cycle). Returns the path written.

    Raises:
        ValueError: no models, an unknown ``reference``, or no Conv/Linear layer.
    """
    if not models:
        raise ValueError("compare_weight_histograms needs at least one model")
    labels: Sequence[str] = list(models)
    reference = reference if reference is not None else labels[0]
    if reference not in models:
        raise ValueError(f"reference={reference!r} is not valid: one of {', '.join(map(repr, labels))}")
    weights = {label: _weights(model) for label, model in models.items()}
    names = _ranked(weights[reference], layers)
    if not names:
        raise ValueError(f"model {reference!r} has no Conv/Linear layer to plot")
    figure, axes = _grid(
        len(names),
        title or f"{' vs '.join(labels)}: the {len(names)} layers with the largest max|w|/std in {reference!r}",
        title_lines=1 + len(labels),
    )
    colors = [(colors or {}).get(label, f"C{i}") for i, label in enumerate(labels)]
    for ax, name in zip(axes, names):
        present = [(label, color, weights[label][name]) for label, color in zip(labels, colors) if name in weights[label]]
        low = min(float(w.min()) for _, _, w in present)
        high = max(float(w.max()) for _, _, w in present)
        edges = np.linspace(low, high, bins + 1) if high > low else bins
        lines = []
        for label, color, w in present:
            ax.hist(w, bins=edges, histtype="stepfilled", color=color, alpha=0.25)
            ax.hist(w, bins=edges, histtype="step", color=color, linewidth=1.4, label=label)
            lines.append(f"{label}: {_summary(w)}")
        _label_axes(ax, f"{name}\n" + "\n".join(lines))
        ax.legend(fontsize=8, loc="upper right")
    return save_png(figure, path)

"""The figures of a sweep report, drawn from plain numbers (no MLflow, no Optuna here).

:mod:`r2sweep.analysis.report` reads a sweep out of MLflow and hands each figure
the few numbers it shows. Every figure colours an R2 kind the same way, with
"no R2" in grey, so a reader learns the legend once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from r2sweep.core.plots import new_figure, save_png

__all__ = [
    "TrialPoint",
    "BitsSeries",
    "kind_color",
    "optimization_history",
    "parameter_importances",
    "accuracy_vs_bits",
    "pareto_front_plot",
]

_KIND_COLORS = {"none": "0.45", "linf": "tab:blue", "margin": "tab:orange", "softminmax": "tab:green"}
_SPARE_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def kind_color(kind: str) -> str:
    """One colour per R2 kind, the same in every figure (registered extra kinds get spare ones)."""
    if kind in _KIND_COLORS:
        return _KIND_COLORS[kind]
    return _SPARE_COLORS[sum(map(ord, kind)) % len(_SPARE_COLORS)]


def _kind_label(kind: str) -> str:
    return "no R2" if kind == "none" else f"R2 {kind}"


@dataclass(frozen=True)
class TrialPoint:
    """One trial in start order: its objective if it finished, else its last proxy."""

    number: int  # 1-based, in the order the trials started
    kind: str  # the R2 kind it trained with
    outcome: str  # finished | stopped | failed | diverged | running
    objective: float | None = None
    proxy: float | None = None  # the last low-bit proxy accuracy it reported


@dataclass(frozen=True)
class BitsSeries:
    """One trial's accuracy at each weight bit width of one downstream method."""

    label: str
    kind: str
    accuracy: Mapping[int, float]  # weight bits -> top-1
    fp: float | None = None  # the same trial's full-precision top-1
    spread: Mapping[int, float] | None = None  # weight bits -> standard deviation over seeds (error bars)


def optimization_history(
    points: Sequence[TrialPoint], objective: str, mode: str, path: str | os.PathLike[str]
) -> Path:
    """Objective per trial (coloured by R2 kind) and the best so far; stopped trials at their last proxy."""
    figure = new_figure(8.0, 4.2)
    ax = figure.subplots()
    better = max if mode == "max" else min
    best, steps = None, []
    for point in points:
        if point.objective is not None:
            best = point.objective if best is None else better(best, point.objective)
        steps.append(best)
    kinds = sorted({p.kind for p in points})
    for kind in kinds:
        # Every kind gets its legend entry, also one whose trials were all stopped.
        done = [p for p in points if p.kind == kind and p.objective is not None]
        ax.scatter([p.number for p in done], [p.objective for p in done], s=36, color=kind_color(kind),
                   edgecolor="black", linewidth=0.4, label=_kind_label(kind), zorder=3)
    stopped = [p for p in points if p.objective is None and p.proxy is not None]
    for kind in kinds:
        mine = [p for p in stopped if p.kind == kind]
        if mine:
            ax.scatter([p.number for p in mine], [p.proxy for p in mine], s=36, facecolor="none",
                       edgecolor=kind_color(kind), linewidth=1.2, zorder=3)
    if stopped:
        ax.scatter([], [], s=36, facecolor="none", edgecolor="0.3", label="stopped early: its last proxy")
    failed = [p for p in points if p.outcome in ("failed", "diverged")]
    if failed:
        floor = min([v for p in points for v in (p.objective, p.proxy) if v is not None], default=0.0)
        ax.scatter([p.number for p in failed], [floor] * len(failed), marker="x", color="tab:red", s=40,
                   label="failed / diverged", zorder=3)
    known = [(p.number, s) for p, s in zip(points, steps) if s is not None]
    if known:
        ax.step([n for n, _ in known], [s for _, s in known], where="post", color="black", linewidth=1.4,
                label="best so far", zorder=2)
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(objective)
    ax.set_title(f"Optimization history: {objective} ({mode}imize)", fontsize=11)
    ax.grid(True, alpha=0.3)
    if points:
        ax.set_xlim(0.5, len(points) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="best")
    return save_png(figure, path)


def parameter_importances(
    groups: Sequence[tuple[str, Mapping[str, float]]], path: str | os.PathLike[str]
) -> Path:
    """Horizontal bars, one panel per group of trials (e.g. all finished, and those with R2 on)."""
    figure = new_figure(6.2 * len(groups), 0.9 + 0.45 * max(len(g) for _, g in groups))
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, (title, importances) in zip(axes, groups):
        ranked = sorted(importances.items(), key=lambda item: item[1])
        ax.barh([name for name, _ in ranked], [value for _, value in ranked], color="tab:blue", alpha=0.8)
        for y, (_, value) in enumerate(ranked):
            ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(1.0, max((v for _, v in ranked), default=0) * 1.15))
        ax.set_xlabel("importance (fANOVA, sums to 1)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    return save_png(figure, path)


def accuracy_vs_bits(
    panels: Sequence[tuple[str, Sequence[BitsSeries]]], path: str | os.PathLike[str]
) -> Path:
    """Top-1 against weight bit width, one panel per downstream method, one line per trial shown.

    Each trial's FP accuracy is a dotted line of its colour: the gap to it is
    what quantization cost that model.
    """
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = new_figure(5.8 * columns, 3.9 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[len(panels):]:
        unused.set_visible(False)
    for ax, (method, series) in zip(axes, panels):
        all_bits = sorted({b for s in series for b in s.accuracy})
        for index, line in enumerate(series):
            bits = sorted(line.accuracy)
            color = kind_color(line.kind)
            style = "--" if line.kind == "none" else "-"
            marker = "os^Dv"[index % 5]
            errors = [line.spread.get(b, 0.0) for b in bits] if line.spread else None
            ax.errorbar(bits, [line.accuracy[b] for b in bits], yerr=errors, fmt=style, marker=marker, color=color,
                        linewidth=1.6, markersize=6, capsize=4 if errors else 0, label=line.label)
            if line.fp is not None:
                ax.axhline(line.fp, color=color, linestyle=":", linewidth=1)
        ax.set_xticks(all_bits)
        ax.set_xticklabels([f"W{b}" for b in all_bits])
        if len(all_bits) == 1:
            ax.set_xlim(all_bits[0] - 1, all_bits[0] + 1)
        ax.set_xlabel("weight bit width")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{method}  (dotted: each model's FP top-1)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return save_png(figure, path)


def pareto_front_plot(
    points: Sequence[tuple[float, float, str]],
    front: Sequence[tuple[float, float]],
    x_metric: str,
    y_metric: str,
    path: str | os.PathLike[str],
    chosen: tuple[float, float] | None = None,
) -> Path:
    """Every finished trial as (x, y) coloured by R2 kind, the Pareto front joined, the chosen trial ringed."""
    figure = new_figure(6.4, 4.6)
    ax = figure.subplots()
    for kind in sorted({k for _, _, k in points}):
        mine = [(x, y) for x, y, k in points if k == kind]
        ax.scatter([x for x, _ in mine], [y for _, y in mine], s=36, color=kind_color(kind), edgecolor="black",
                   linewidth=0.4, label=_kind_label(kind), zorder=3)
    ordered = sorted(front)
    ax.plot([x for x, _ in ordered], [y for _, y in ordered], "-", color="black", linewidth=1.2,
            label=f"Pareto front ({len(ordered)} trial{'s' if len(ordered) != 1 else ''})", zorder=2)
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], s=160, facecolor="none", edgecolor="tab:red", linewidth=1.6,
                   label="selected (best on the first objective)", zorder=4)
    ax.set_xlabel(x_metric)
    ax.set_ylabel(y_metric)
    ax.set_title(f"Pareto front: {y_metric} vs {x_metric}", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_png(figure, path)


def accuracy_vs_bytes(series: Sequence[tuple[str, str, Sequence[tuple[float, float, str]], tuple[float, float] | None]],
                      path: str | os.PathLike[str]) -> Path:
    """Top-1 against the model's size in bytes (log scale): one line per trial shown, a point per result.

    ``series``: ``(label, R2 kind, [(bytes, top-1, result name)], (FP bytes, FP top-1) or None)``.
    Each trial's results are joined from smallest to largest, and its FP model is a
    hollow marker of its colour at the right: the trade a result makes is read off directly.
    """
    figure = new_figure(7.2, 4.8)
    ax = figure.subplots()
    for index, (label, kind, points, fp) in enumerate(series):
        color = kind_color(kind)
        ordered = sorted(points)
        marker = "os^Dv"[index % 5]
        ax.plot([b for b, _, _ in ordered], [t for _, t, _ in ordered], "--" if kind == "none" else "-", marker=marker,
                color=color, linewidth=1.4, markersize=6, label=label)
        for size, top1, name in ordered:
            ax.annotate(name, (size, top1), textcoords="offset points", xytext=(4, 4), fontsize=6, color=color)
        if fp is not None:
            ax.scatter([fp[0]], [fp[1]], s=50, facecolor="none", edgecolor=color, linewidth=1.4, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("model size (bytes: packed weights, their grids, the float rest)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy against size (hollow: each model in FP32)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_png(figure, path)

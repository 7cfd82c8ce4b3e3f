"""Weight statistics that show what R2-Loss does to a model's ranges.

Names follow DESIGN.md: ``weights/max_abs``, ``weights/range`` and
``weights/kurtosis`` are means over the Conv/Linear layers (the layers R2 acts on).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from r2sweep.core.losses import regularized_layers

__all__ = ["excess_kurtosis", "layer_weight_stats", "weight_stats"]


def excess_kurtosis(w: Tensor) -> float:
    """``E[(w - mu)^4] / var^2 - 3``: 0 for a Gaussian, large when a few outliers stretch the tails."""
    x = w.detach().double().reshape(-1)
    centered = x - x.mean()
    var = centered.pow(2).mean()
    if var <= 0:
        return 0.0
    return float(centered.pow(4).mean() / var.pow(2) - 3.0)


@torch.no_grad()
def layer_weight_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per layer: ``max_abs``, ``range`` (max - min), ``kurtosis`` (excess), ``std``."""
    stats = {}
    for name, weight in regularized_layers(model):
        lo, hi = torch.aminmax(weight.detach())
        stats[name] = {
            "max_abs": float(torch.maximum(hi, -lo)),
            "range": float(hi - lo),
            "kurtosis": excess_kurtosis(weight),
            "std": float(weight.detach().std()) if weight.numel() > 1 else 0.0,
        }
    return stats


def weight_stats(model: nn.Module) -> dict[str, float]:
    """The three summary metrics, each the mean over layers."""
    per_layer = list(layer_weight_stats(model).values())
    if not per_layer:
        return {}
    return {
        f"weights/{key}": sum(layer[key] for layer in per_layer) / len(per_layer)
        for key in ("max_abs", "range", "kurtosis")
    }

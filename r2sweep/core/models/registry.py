"""The model registry and :func:`create_model`, the one way the rest of r2sweep builds a network.

Builders registered here receive already-validated arguments and a *resolved*
stem (``"small"`` or ``"imagenet"``, never ``"auto"``), so each architecture
module only has to translate them into layers.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Protocol

from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.registry import Registry
from r2sweep.core.validate import require_int

__all__ = [
    "init_conv_bn_",
    "ModelBuilder",
    "STEMS",
    "MODELS",
    "register_model",
    "create_model",
    "list_models",
    "resolve_stem",
    "scale_channels",
]

#: Accepted values of ``model.stem``.
STEMS = ("auto", "small", "imagenet")

# Inputs up to this side length (8x8 digits, 32x32 CIFAR, 64x64 downsampled
# ImageNet variants) lose too much resolution to a stride-4 ImageNet stem.
_SMALL_STEM_MAX_INPUT = 64


class ModelBuilder(Protocol):
    """Signature every registered builder implements (all arguments keyword)."""

    def __call__(
        self, *, num_classes: int, in_channels: int, input_size: int, width: float, stem: str
    ) -> nn.Module: ...


MODELS: Registry[ModelBuilder] = Registry("model.name")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a builder under ``name`` (the value of ``model.name``).

    The builder is called with keyword arguments ``num_classes``, ``in_channels``,
    ``input_size``, ``width`` and ``stem`` (``"small"`` or ``"imagenet"``) and
    must return a module mapping ``(N, in_channels, input_size, input_size)``
    floats to ``(N, num_classes)`` logits.
    """
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return MODELS.names()


def resolve_stem(stem: str, input_size: int) -> str:
    """Turn ``"auto"`` into ``"small"`` or ``"imagenet"`` according to ``input_size``.

    Raises:
        ConfigError: ``model.stem`` is not one of :data:`STEMS`.
    """
    if stem not in STEMS:
        raise ConfigError("model.stem", stem, f"choose one of {list(STEMS)}")
    if stem != "auto":
        return stem
    return "small" if input_size <= _SMALL_STEM_MAX_INPUT else "imagenet"


def scale_channels(channels: int, width: float, *, divisor: int = 8, min_channels: int = 8) -> int:
    """``channels * width`` rounded to a multiple of ``divisor``, at least ``min_channels``.

    Multiples of 8 keep the channel counts friendly to vectorised kernels, and the
    rounding never drops more than 10% below the requested width (the rule of
    torchvision's MobileNets), so small widths do not silently collapse.
    """
    target = channels * width
    rounded = max(min_channels, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return rounded


def init_conv_bn_(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal convs (fan-out), BatchNorm at identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    width: float = 1.0,
    stem: str = "auto",
) -> nn.Module:
    """Build a freshly initialised model.

    Args:
        name: a registered model name, see :func:`list_models`.
        num_classes: number of output logits (>= 2).
        in_channels: channels of the input images (>= 1).
        input_size: side of the square input in pixels (>= 4); picks the stem
            when ``stem="auto"`` and lets models size their downsampling.
        width: channel multiplier (> 0); 1.0 is the published architecture.
        stem: ``"auto"`` (``"small"`` for inputs up to 64 px, else ``"imagenet"``),
            ``"small"`` (stride-1 first layer, no max-pool) or ``"imagenet"``.

    Returns:
        A module mapping ``(N, in_channels, input_size, input_size)`` float
        tensors to ``(N, num_classes)`` logits.

    Raises:
        ConfigError: an argument is invalid; the message names the ``model.*`` field.
    """
    builder = MODELS.get(name)
    num_classes = require_int("model.num_classes", num_classes, 2)
    in_channels = require_int("model.in_channels", in_channels, 1)
    input_size = require_int("model.input_size", input_size, 4)
    if (
        isinstance(width, bool)
        or not isinstance(width, Real)
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ConfigError("model.width", width, "a finite number > 0 (1.0 = published widths)")
    resolved = resolve_stem(stem, input_size)
    return builder(
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        width=float(width),
        stem=resolved,
    )

"""The model registry and :func:`create_model`, the one way the rest of r2sweep builds a network.

Every entry follows the model-factory contract (:mod:`r2sweep.core.factories`):
called with keyword arguments, ``num_classes``, ``in_channels`` and ``input_size``
when its signature names them, plus its own options, it returns an ``nn.Module``
mapping ``(N, in_channels, input_size, input_size)`` to ``(N, num_classes)``. A
user's ``model.factory`` and an installed plugin (entry-point group
``r2sweep.models``) follow the same contract, so there is one way to build a model.

The package's own architectures take two options, ``width`` and ``stem``; they are
registered with :func:`register_builtin`, which checks both and resolves
``stem: auto`` from the input size before the architecture module sees them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any, Callable, Protocol

from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.factories import call_factory, check_options, factory_signature
from r2sweep.core.registry import Registry
from r2sweep.core.validate import require_int

__all__ = [
    "init_conv_bn_",
    "ModelBuilder",
    "PROVIDED",
    "STEMS",
    "MODELS",
    "build_model",
    "register_builtin",
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


#: What r2sweep gives a model factory (each only when its signature names it).
PROVIDED = ("num_classes", "in_channels", "input_size")


class ModelBuilder(Protocol):
    """The shape of a built-in architecture's builder (:func:`register_builtin`)."""

    def __call__(
        self, *, num_classes: int, in_channels: int, input_size: int, width: float, stem: str
    ) -> nn.Module: ...


MODELS: Registry[Callable[..., nn.Module]] = Registry("model.name", entry_points="r2sweep.models")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name`` (the value of ``model.name``), by the contract.

    >>> @register_model("tiny_mlp")                                     # doctest: +SKIP
    ... def tiny_mlp(*, num_classes, in_channels, input_size, hidden=64):
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2, hidden),
    ...                          nn.ReLU(), nn.Linear(hidden, num_classes))
    """
    return MODELS.register(name)


def register_builtin(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register one of the package's architectures: a factory with the options ``width`` and ``stem``.

    The builder itself receives ``width`` checked (> 0, finite) and ``stem``
    resolved (``"small"`` or ``"imagenet"``, never ``"auto"``).
    """

    def add(builder: ModelBuilder) -> ModelBuilder:
        # Not functools.wraps: inspect.signature would follow __wrapped__ to the builder's
        # signature, and the factory's own one (width and stem with defaults) is the contract.
        def factory(*, num_classes: int, in_channels: int, input_size: int, width: float = 1.0,
                    stem: str = "auto") -> nn.Module:
            if isinstance(width, bool) or not isinstance(width, Real) or not math.isfinite(width) or width <= 0:
                raise ConfigError("model.width", width, "a finite number > 0 (1.0 = published widths)")
            return builder(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                           width=float(width), stem=resolve_stem(stem, input_size))

        factory.__name__ = factory.__qualname__ = builder.__name__
        factory.__doc__ = builder.__doc__
        factory.__module__ = builder.__module__
        MODELS.register(name)(factory)
        return builder

    return add


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


def build_model(
    factory: Callable[..., Any],
    *,
    field: str,
    reference: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    options: Mapping[str, Any],
) -> nn.Module:
    """Call a model factory by the contract and check that it returned a module.

    Args:
        field: what errors name: ``model.name`` (a registered entry) or ``model.factory``.
        reference: the name or ``module:function`` (shown in errors).

    Raises:
        ConfigError: an unknown or missing option (``model.<option>``), the factory raised,
            or it did not return an ``nn.Module``.
    """
    signature = factory_signature(field, factory)
    check_options("model", reference, signature, PROVIDED, options)
    provided = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    model = call_factory(field, reference, factory, signature, provided, options)
    if not isinstance(model, nn.Module):
        raise ConfigError(field, reference, f"a factory that returns a torch.nn.Module; it returned a {type(model).__name__}")
    return model


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    **options: Any,
) -> nn.Module:
    """Build a freshly initialised model.

    Args:
        name: a registered model name, see :func:`list_models`.
        num_classes: number of output logits (>= 2).
        in_channels: channels of the input images (>= 1).
        input_size: side of the square input in pixels (>= 4).
        **options: the model's own options. The package's architectures take
            ``width`` (> 0, default 1.0: the published architecture) and ``stem``
            (``"auto"``: ``"small"`` for inputs up to 64 px, else ``"imagenet"``;
            ``"small"``: stride-1 first layer, no max-pool; or ``"imagenet"``).

    Returns:
        A module mapping ``(N, in_channels, input_size, input_size)`` float
        tensors to ``(N, num_classes)`` logits.

    Raises:
        ConfigError: an argument is invalid; the message names the ``model.*`` field.
    """
    factory = MODELS.get(name)
    num_classes = require_int("model.num_classes", num_classes, 2)
    in_channels = require_int("model.in_channels", in_channels, 1)
    input_size = require_int("model.input_size", input_size, 4)
    return build_model(factory, field="model.name", reference=name, num_classes=num_classes,
                       in_channels=in_channels, input_size=input_size, options=options)

"""Model zoo: ``create_model(name, ...)`` builds any registered architecture.

Registered names: ``small_cnn``, ``resnet18``, ``mobilenet_v1``, ``mobilenet_v2``.
Importing this package registers them; new ones use :func:`register_model` (the
model-factory contract), an entry point in the ``r2sweep.models`` group, or
``model.factory``.
"""

from __future__ import annotations

from r2sweep.core.models.registry import (
    PROVIDED,
    build_model,
    MODELS,
    STEMS,
    ModelBuilder,
    create_model,
    list_models,
    register_model,
    resolve_stem,
    scale_channels,
)

# Imported for their side effect: each module registers its builders.
from r2sweep.core.models import mobilenet, resnet, small_cnn  # noqa: E402,F401  isort: skip

__all__ = [
    "MODELS",
    "PROVIDED",
    "build_model",
    "STEMS",
    "ModelBuilder",
    "create_model",
    "list_models",
    "register_model",
    "resolve_stem",
    "scale_channels",
]

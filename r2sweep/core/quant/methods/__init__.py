"""The downstream methods a trial runs after pre-training, by name (``downstream.N.method``).

Each method module registers a config class and a handler
(:func:`~r2sweep.core.quant.methods.base.register_method`); a trial looks the
handler up in :data:`DOWNSTREAM_METHODS`. :func:`load_downstream` reads the
``downstream:`` list strictly: unknown keys, keys only another method uses,
results two entries would both produce.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from r2sweep.core.config.sections import from_dict
from r2sweep.core.errors import ConfigError
from r2sweep.core.quant.methods.base import (
    DEFAULT_RANGE,
    DEFAULT_SYMMETRIC,
    DOWNSTREAM_METHODS,
    FLOAT_ACT_BITS,
    DownstreamContext,
    DownstreamMethod,
    FineTuneConfig,
    Handler,
    MethodConfig,
    Rounding,
    calibration_images,
    register_method,
)
from r2sweep.core.validate import check, reject_unknown

# Importing a method's module registers it. Registration order is the order
# messages and docs list the methods in (by cost: ptq, qat, dkm), hence this line.
from r2sweep.core.quant.methods import ptq, qat, dkm  # noqa: F401  isort: skip
from r2sweep.core.quant.methods.dkm import DKMConfig
from r2sweep.core.quant.methods.ptq import PTQConfig
from r2sweep.core.quant.methods.qat import QATConfig

__all__ = [
    "DEFAULT_RANGE",
    "DEFAULT_SYMMETRIC",
    "DOWNSTREAM_METHODS",
    "FLOAT_ACT_BITS",
    "DKMConfig",
    "DownstreamContext",
    "DownstreamMethod",
    "FineTuneConfig",
    "Handler",
    "MethodConfig",
    "PTQConfig",
    "QATConfig",
    "Rounding",
    "calibration_images",
    "downstream_fields",
    "load_downstream",
    "method_config",
    "register_method",
]

#: The method of an entry that does not name one.
DEFAULT_METHOD = "ptq"


def method_config(method: str) -> type[MethodConfig]:
    """The config class of a registered method (ConfigError naming ``downstream.method`` otherwise)."""
    return DOWNSTREAM_METHODS.get(method).config


def downstream_fields() -> list[str]:
    """Every key some method's entry may hold, ``method`` first, each method's in registration order."""
    names: dict[str, None] = {}
    for method in DOWNSTREAM_METHODS:
        names.update(dict.fromkeys(method_config(method).field_names()))
    return list(names)


def load_downstream(data: Any, path: str = "downstream") -> list[MethodConfig]:
    """The ``downstream:`` list (a single mapping is a one-entry list), strictly.

    Raises:
        ConfigError: naming ``downstream[i].field``.
    """
    if data is None:
        return []
    if isinstance(data, Mapping):
        data = [data]
    check(isinstance(data, list), path, data, f"a list of {{method: {'|'.join(DOWNSTREAM_METHODS.names())}, ...}} entries")
    entries: list[MethodConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        entry = _load_entry(item, where)
        for name in entry.result_names():
            check(name not in seen, where, name, f"results distinct from entry {seen.get(name)} (both produce {name}/top1); "
                  "set a distinct 'tag' on one of them")
            seen[name] = i
        entries.append(entry)
    return entries


def _load_entry(item: Any, where: str) -> MethodConfig:
    check(isinstance(item, Mapping), where, item, "a mapping such as {method: ptq, algorithm: adaround, weight_bits: [2]}")
    method = item.get("method", DEFAULT_METHOD)
    known = downstream_fields()
    registered = isinstance(method, str) and method in DOWNSTREAM_METHODS
    if registered:
        # A knob of another method is a mistake, not a no-op (a ``tau`` on a PTQ entry).
        own = method_config(method).field_names()
        for key in item:
            if key in known and key not in own:
                users = [m for m in DOWNSTREAM_METHODS if key in method_config(m).field_names()]
                raise ConfigError(f"{where}.{key}", item[key], f"not used by method {method} (only by {users})")
    reject_unknown(item, known, lambda key: f"{where}.{key}")
    check(isinstance(method, str), f"{where}.method", method, "a string")
    check(registered, f"{where}.method", method, f"one of {DOWNSTREAM_METHODS.names()}")
    fields = {key: value for key, value in item.items() if key != "method"}
    return _with_path(lambda: from_dict(method_config(method), fields, where), where)


def _with_path(build: Callable[[], MethodConfig], where: str) -> MethodConfig:
    # __post_init__ names fields "downstream.x"; in a list, "downstream[i].x" says which entry.
    try:
        return build()
    except ConfigError as error:
        if error.field.startswith("downstream.") and where != "downstream":
            raise ConfigError(where + error.field[len("downstream") :], error.value, error.allowed) from None
        raise

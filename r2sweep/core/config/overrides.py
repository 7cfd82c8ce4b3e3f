"""Overrides as every face takes them: ``{path: value}``, ``(path, value)`` pairs or ``"PATH=VALUE"`` text.

One normal form, a list of ``(dotted path, value)`` pairs, for the loaders to
write in (:func:`~r2sweep.core.config.trial.apply_overrides`). Text is read as
``--set`` reads it: the value as strict YAML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from r2sweep.core.config.trial import parse_override

__all__ = ["Overrides", "override_pairs"]

Overrides = Mapping[str, Any] | Iterable["tuple[str, Any] | str"] | None


def override_pairs(overrides: Overrides) -> list[tuple[str, Any]]:
    """``overrides`` as ``(path, value)`` pairs, in order.

    Raises:
        ConfigError: a text override that is not ``PATH=VALUE`` or whose value is not YAML.

    >>> override_pairs({"train.lr": 0.1}), override_pairs(["r2.kind=linf", ("seed", 3)])
    ([('train.lr', 0.1)], [('r2.kind', 'linf'), ('seed', 3)])
    """
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    return [parse_override(item) if isinstance(item, str) else (item[0], item[1]) for item in overrides]

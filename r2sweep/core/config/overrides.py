"""Overrides: ``{path: value}``, ``(path, value)`` pairs or ``"PATH=VALUE"`` text, written into a config.

One normal form, a list of ``(dotted path, value)`` pairs (:func:`override_pairs`),
that the loaders write in (:func:`apply_overrides`) before they validate. Text is
read as ``--set`` reads it (:func:`parse_override`): the value as strict YAML.
An error names an override as Python does, ``overrides['r2.kind']``; the command
line shows it as ``--set r2.kind`` (``r2sweep.cli.errors``, where it prints).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from r2sweep.core.config import strict_yaml
from r2sweep.core.errors import ConfigError
from r2sweep.core.validate import check

__all__ = ["Overrides", "override_pairs", "parse_override", "apply_overrides", "override_field", "OVERRIDES"]

#: The keyword an error names for the overrides as a whole (``overrides='epochs' is not valid: ...``).
OVERRIDES = "overrides"

Overrides = Mapping[str, Any] | Iterable["tuple[str, Any] | str"] | None


def override_field(path: str) -> str:
    """The field an error about the override of ``path`` names: ``overrides['r2.kind']``."""
    return f"{OVERRIDES}[{path!r}]"


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


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is read as strict YAML (``[2, 4]``, ``1e-3``, ``true``)."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise ConfigError(OVERRIDES, text, "PATH=VALUE, e.g. train.lr=0.1 or downstream.0.weight_bits=[2,4]")
    try:
        value = strict_yaml.loads(raw, source=raw, root=path) if raw.strip() else None
    except ConfigError as error:  # the value is not in the file: name the --set, not the file
        if error.field == "file":
            raise ConfigError(override_field(path), raw, f"a YAML value (a number, a string, [a, list], true/false); "
                              f"{error.allowed.removeprefix('valid YAML; ')}") from None
        raise ConfigError(override_field(error.field), error.value, error.allowed) from None
    return path, value


def apply_overrides(data: Any, overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``data`` with each ``(dotted path, value)`` written in.

    Missing mappings along a path are created (``r2.kind=linf`` on a file
    without ``r2:``); list entries are addressed by index and must exist.
    The result is validated by :func:`load_trial_config` like any file.
    """
    result = copy.deepcopy(dict(data or {}))
    for path, value in overrides:
        node: Any = result
        parts = path.split(".")
        depth = 0
        while depth < len(parts):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                part = parts[depth]
                check(part.isdigit() and int(part) < len(node), where, part, f"an index below {len(node)} (the list has {len(node)} entries)")
                key: Any = int(part)
                step = 1
            elif isinstance(node, dict):
                # Keys may hold dots themselves (search: {r2.strength: ...}): the
                # longest existing key that starts the rest of the path wins.
                step = next((n for n in range(len(parts) - depth, 1, -1) if ".".join(parts[depth : depth + n]) in node), 1)
                key = ".".join(parts[depth : depth + step])
                if depth + step < len(parts) and node.get(key) is None:
                    node[key] = {}
            else:
                raise ConfigError(where, node, "a mapping or a list to set a field inside")
            depth += step
            if depth == len(parts):
                node[key] = value
            else:
                node = node[key]
    return result

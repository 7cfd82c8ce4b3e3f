"""Overrides: ``{path: value}``, ``(path, value)`` pairs or ``"PATH=VALUE"`` text, written into a config.

One normal form, a list of ``(dotted path, value)`` pairs (:func:`override_pairs`),
that the loaders write in (:func:`apply_overrides`) before they validate. Text is
read as ``--set`` reads it (:func:`parse_override`): the value as strict YAML.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from r2sweep.core.config import strict_yaml
from r2sweep.core.errors import ConfigError
from r2sweep.core.validate import check

__all__ = ["Overrides", "override_pairs", "parse_override", "apply_overrides", "override_field", "CLI_LABEL",
           "PYTHON_LABEL"]

#: How an error names an override: ``--set PATH`` on the command line, ``overrides['PATH']`` from Python.
CLI_LABEL = "--set"
PYTHON_LABEL = "overrides"

Overrides = Mapping[str, Any] | Iterable["tuple[str, Any] | str"] | None


def override_field(path: str, label: str = PYTHON_LABEL) -> str:
    """The field an error about the override of ``path`` names: ``--set r2.kind`` or ``overrides['r2.kind']``."""
    return f"{label} {path}" if label.startswith("-") else f"{label}[{path!r}]"


def override_word(label: str = PYTHON_LABEL) -> str:
    """What the fix tells a person to drop: ``the --set`` or ``the override``."""
    return f"the {label}" if label.startswith("-") else "the override"


def override_pairs(overrides: Overrides, label: str = PYTHON_LABEL) -> list[tuple[str, Any]]:
    """``overrides`` as ``(path, value)`` pairs, in order (``label``: how errors name them).

    Raises:
        ConfigError: a text override that is not ``PATH=VALUE`` or whose value is not YAML.

    >>> override_pairs({"train.lr": 0.1}), override_pairs(["r2.kind=linf", ("seed", 3)])
    ([('train.lr', 0.1)], [('r2.kind', 'linf'), ('seed', 3)])
    """
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    return [parse_override(item, label) if isinstance(item, str) else (item[0], item[1]) for item in overrides]


def parse_override(text: str, label: str = CLI_LABEL) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is read as strict YAML (``[2, 4]``, ``1e-3``, ``true``)."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise ConfigError(label, text, "PATH=VALUE, e.g. train.lr=0.1 or downstream.0.weight_bits=[2,4]")
    try:
        value = strict_yaml.loads(raw, source=raw, root=path) if raw.strip() else None
    except ConfigError as error:  # the value is not in the file: name the --set, not the file
        if error.field == "file":
            raise ConfigError(override_field(path, label), raw, f"a YAML value (a number, a string, [a, list], true/false); "
                              f"{error.allowed.removeprefix('valid YAML; ')}") from None
        raise ConfigError(override_field(error.field, label), error.value, error.allowed) from None
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

"""The ``search:`` section: one searched field per entry, its distribution and its condition.

Each entry maps a dotted field path to one distribution (``choice``, ``uniform``,
``loguniform``, ``int``) and optionally ``when`` (the values of parameters
searched above it that it needs). Every value a distribution can produce (the
choices, the ends of a range) is checked by loading the trial config with it
written in, so a bad path or value fails with the field's own message. The
``sweep.start_points`` must lie in this space; they are checked here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from r2sweep.core.config.consistency import representative
from r2sweep.core.config.overrides import apply_overrides
from r2sweep.core.config.trial import TRIAL_SECTIONS, load_trial_config
from r2sweep.core.errors import ConfigError
from r2sweep.core.validate import check, is_number, require_int

__all__ = ["DISTRIBUTIONS", "SearchParam", "load_param", "validate_values", "load_start_points", "mapping_at"]

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


@dataclass(frozen=True)
class SearchParam:
    """One searched field: its dotted path, distribution and condition."""

    path: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # choice: the options; ranges: (low, high)
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (parameter, allowed values), all must hold

    def applies(self, sampled: Mapping[str, Any]) -> bool:
        """Whether this parameter is sampled given the values sampled so far."""
        return all(name in sampled and sampled[name] in allowed for name, allowed in self.when)

    def edge_values(self) -> list[Any]:
        """Every value worth validating: all choices, or both ends of a range."""
        return list(self.values)


def mapping_at(value: Any, field_name: str, example: str) -> Mapping[str, Any]:
    check(isinstance(value, Mapping), field_name, value, f"a mapping, e.g. {example}")
    return value


def _range(path: str, kind: str, value: Any) -> tuple[Any, ...]:
    where = f"search.{path}.{kind}"
    check(isinstance(value, list) and len(value) == 2, where, value, "[low, high]")
    low, high = value
    if kind == "int":
        require_int(where, low, -(2**31))
        require_int(where, high, -(2**31))
        check(low <= high, where, value, "[low, high] with low <= high")
    else:
        check(is_number(low) and is_number(high), where, value, "[low, high] of numbers")
        check(low < high, where, value, "[low, high] with low < high")
        if kind == "loguniform":
            check(low > 0, where, value, "[low, high] with 0 < low < high (a log range)")
        low, high = float(low), float(high)
    return (low, high)


def load_param(path: Any, data: Any, earlier: Mapping[str, SearchParam]) -> SearchParam:
    check(isinstance(path, str) and path.strip() == path and path != "", "search", path, "dotted field paths such as r2.strength")
    data = mapping_at(data, f"search.{path}", "{loguniform: [1.0e-4, 1.0]} or {choice: [a, b]}")
    kinds = [k for k in data if k in DISTRIBUTIONS]
    unknown = [k for k in data if k not in DISTRIBUTIONS and k != "when"]
    check(not unknown, f"search.{path}.{unknown[0] if unknown else ''}", data.get(unknown[0]) if unknown else None,
          f"unknown key; a parameter takes one of {list(DISTRIBUTIONS)} and optionally 'when'")
    check(len(kinds) == 1, f"search.{path}", dict(data), f"exactly one distribution out of {list(DISTRIBUTIONS)}")
    kind = kinds[0]
    if kind == "choice":
        options = data[kind]
        check(isinstance(options, list) and len(options) > 0, f"search.{path}.choice", options, "a non-empty list")
        check(all(isinstance(o, (str, int, float, bool)) or o is None for o in options), f"search.{path}.choice", options, "a list of scalars")
        check(len(set(map(repr, options))) == len(options), f"search.{path}.choice", options, "distinct values")
        values: tuple[Any, ...] = tuple(options)
    else:
        values = _range(path, kind, data[kind])
    when: list[tuple[str, tuple[Any, ...]]] = []
    raw_when = data.get("when")
    if raw_when is not None:
        raw_when = mapping_at(raw_when, f"search.{path}.when", "{r2.kind: [linf, margin]}")
        for name, allowed in raw_when.items():
            where = f"search.{path}.when.{name}"
            check(name in earlier, where, allowed, f"a parameter searched above this one; searched so far: {list(earlier)}")
            allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            check(len(allowed) > 0, where, list(allowed), "a non-empty list of values")
            source = earlier[name]
            if source.kind == "choice":
                bad = [v for v in allowed if v not in source.values]
                check(not bad, where, bad[0] if bad else None, f"values {name} can take: {list(source.values)}")
            when.append((name, allowed))
    return SearchParam(path, kind, values, tuple(when))


def validate_values(base: Mapping[str, Any], params: Mapping[str, SearchParam], *,
                    sections: tuple[str, ...] | None = None, then: Callable[[Any], Any] | None = None) -> None:
    """Each value a parameter can take, written into the base config together with the values its
    conditions require, and the result loaded as a trial config (and given to ``then``): a path that
    does not exist, or a value its field refuses, fails with the field's own message, as
    ``search.PATH``. ``sections``: only the parameters of these trial sections."""
    for param in params.values():
        if sections is not None and param.path.split(".")[0] not in sections:
            continue
        context = representative(param, params)
        for value in param.edge_values():
            if param.kind == "int":
                value = int(value)
            try:
                config = load_trial_config(apply_overrides(base, [*context.items(), (param.path, value)]))
                if then is not None:
                    then(config)
            except ConfigError as error:
                if error.field.split("[")[0].split(".")[0] in TRIAL_SECTIONS:
                    raise ConfigError(f"search.{param.path}", value, f"{error.field}: {error.allowed}") from None
                raise


def load_start_points(data: Any, params: Mapping[str, SearchParam]) -> tuple[dict[str, Any], ...]:
    check(isinstance(data, list), "sweep.start_points", data,
          "a list of {parameter: value} mappings, e.g. [{train.lr: 0.05, r2.strength: 0.02}]")
    points = []
    for i, point in enumerate(data):
        where = f"sweep.start_points[{i}]"
        point = mapping_at(point, where, "{train.lr: 0.05, r2.strength: 0.02}")
        check(len(point) > 0, where, dict(point), "at least one searched parameter")
        for path, value in point.items():
            check(path in params, f"{where}.{path}", value, f"a searched parameter: {list(params)}")
            _check_in_space(params[path], value, f"{where}.{path}")
        points.append(dict(point))
    return tuple(points)


def _check_in_space(param: SearchParam, value: Any, where: str) -> None:
    """``value`` is one the parameter's distribution can produce (a start point the
    sampler could not have drawn would make Optuna reject the trial)."""
    if param.kind == "choice":
        check(value in param.values, where, value, f"one of search.{param.path}'s choices {list(param.values)}")
        return
    low, high = param.values
    if param.kind == "int":
        check(isinstance(value, int) and not isinstance(value, bool), where, value, "an integer")
    check(is_number(value) and low <= value <= high, where, value, f"a number in search.{param.path}'s range [{low}, {high}]")

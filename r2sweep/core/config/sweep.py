"""The search-space file: a trial config plus ``objective``, ``search`` and ``sweep``.

Everything is validated before anything starts (no Ray session, no MLflow
experiment, no results folder): the trial sections as ``r2sweep trial`` would;
the objective must be a metric some downstream entry produces; every search path
must exist in the trial schema and every value a distribution can produce (the
choices, the ends of a range) must be legal for that field, checked by loading
the trial config with that value written in; ``when`` must name a parameter
searched earlier in the file, with values it can take.

This module imports neither Ray nor Optuna: :mod:`r2sweep.tune.space` turns a
:class:`SweepSpec` into an Optuna define-by-run function.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from r2sweep.core.config.consistency import check_consistency, max_epochs, representative
from r2sweep.core.config.trial import PROXY_FP, TRIAL_SECTIONS, TrialConfig, apply_overrides, load_trial_config
from r2sweep.core.errors import ConfigError
from r2sweep.core.locations import is_uri
from r2sweep.core.validate import check, is_number, reject_unknown, require_int

__all__ = [
    "DISTRIBUTIONS",
    "SAMPLERS",
    "SCHEDULERS",
    "Objective",
    "SearchParam",
    "SweepSettings",
    "SweepSpec",
    "load_sweep_spec",
]

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
SAMPLERS = ("tpe", "gp", "cmaes", "random", "nsga2")
SCHEDULERS = ("asha", "none")
MODES = ("max", "min")
# Samplers that handle several objectives (Optuna's multi-objective support).
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "random")
_TOP_LEVEL = ("name", *TRIAL_SECTIONS, "objective", "search", "sweep")


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str = "max"


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


@dataclass(frozen=True)
class SweepSettings:
    """The ``sweep:`` section."""

    num_samples: int = 16
    max_concurrent: int = 2
    sampler: str = "tpe"
    seed: int = 0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_failures: int = 1
    resources_per_trial: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    # When r2.kind is searched with "none" among its choices: the first trial runs
    # without R2 and the scheduler never stops it early, so every sweep has a
    # finished no-R2 trial to measure R2's gain against.
    baseline: bool = True
    # Configurations to try first, before the sampler draws: a known-good point (an
    # earlier sweep's winner, a paper's setting) is then measured rather than hoped
    # for. Each maps searched parameters to values; the others are sampled.
    start_points: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class SweepSpec:
    """A validated search-space file."""

    name: str
    base: Mapping[str, Any]  # the trial sections as written (the values every trial shares)
    objectives: tuple[Objective, ...]
    params: tuple[SearchParam, ...]
    settings: SweepSettings
    trial: TrialConfig  # the base config, validated

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def baseline_point(self) -> dict[str, Any] | None:
        """The partial config of the no-R2 baseline trial (``{"r2.kind": "none"}``), or None
        when ``sweep.baseline`` is off or the search cannot draw a trial without R2."""
        kind = next((p for p in self.params if p.path == "r2.kind"), None)
        if not self.settings.baseline or kind is None or kind.kind != "choice" or "none" not in kind.values:
            return None
        return {"r2.kind": "none"}

    @property
    def max_epochs(self) -> int:
        """The most pre-training epochs any trial of this sweep runs (``train.epochs`` may be searched)."""
        return max_epochs(self.trial, self.params)

    @property
    def objective_metrics(self) -> tuple[str, ...]:
        """Every objective's metric, in order: a trial is finished only with all of them."""
        return tuple(o.metric for o in self.objectives)

    @property
    def objective(self) -> Objective:
        """The first objective: the one a single-objective searcher and the best-config rule use."""
        return self.objectives[0]

    def ranking(self, metrics: Mapping[str, float]) -> tuple[float, ...]:
        """Sort key of a finished trial, larger is better: the objectives in order
        (negated where minimized), then ``fp/top1`` (the tie-break). One rule for
        every place that picks a best trial."""
        signed = [(1 if o.mode == "max" else -1) * metrics[o.metric] for o in self.objectives]
        return (*signed, metrics.get("fp/top1", 0.0))

    def trial_mapping(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The trial config (plain mapping) with the sampled values written at their paths."""
        return apply_overrides(self.base, list(sampled.items()))

    def trial_config(self, sampled: Mapping[str, Any]) -> TrialConfig:
        return load_trial_config(self.trial_mapping(sampled))

    def data_roots(self) -> list[str]:
        """Every ``data.root`` a trial of this sweep may read (absolute paths)."""
        roots = [self.trial.data.root] if self.trial.data.root else []
        for param in self.params:
            if param.path == "data.root":
                roots.extend(str(v) for v in param.values if v)
        return roots


def _mapping(value: Any, field_name: str, example: str) -> Mapping[str, Any]:
    check(isinstance(value, Mapping), field_name, value, f"a mapping, e.g. {example}")
    return value


def _load_objectives(data: Any, trial: TrialConfig) -> tuple[Objective, ...]:
    check(data is not None, "objective", data, "{metric: <a /top1 key>, mode: max} (or a list of them)")
    items = data if isinstance(data, list) else [data]
    check(len(items) > 0, "objective", data, "at least one {metric, mode}")
    produced = trial.metric_names()
    objectives = []
    for i, item in enumerate(items):
        where = "objective" if not isinstance(data, list) else f"objective[{i}]"
        item = _mapping(item, where, "{metric: ptq_adaround_w2a8/top1, mode: max}")
        reject_unknown(item, ("metric", "mode"), lambda key: f"{where}.{key}")
        metric, mode = item.get("metric"), item.get("mode", "max")
        check(isinstance(metric, str) and metric in produced, f"{where}.metric", metric, f"a metric the trial produces: {produced}")
        check(mode in MODES, f"{where}.mode", mode, f"one of {list(MODES)}")
        objectives.append(Objective(metric, mode))
    metrics = [o.metric for o in objectives]
    check(len(set(metrics)) == len(metrics), "objective", metrics, "distinct metrics")
    return tuple(objectives)


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


def _load_param(path: Any, data: Any, earlier: Mapping[str, SearchParam]) -> SearchParam:
    check(isinstance(path, str) and path.strip() == path and path != "", "search", path, "dotted field paths such as r2.strength")
    data = _mapping(data, f"search.{path}", "{loguniform: [1.0e-4, 1.0]} or {choice: [a, b]}")
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
        raw_when = _mapping(raw_when, f"search.{path}.when", "{r2.kind: [linf, margin]}")
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


def _validate_values(base: Mapping[str, Any], params: Mapping[str, SearchParam]) -> None:
    # Each value a parameter can take is written into the base config together
    # with the values its conditions require, and the result loaded as a trial
    # config: a path that does not exist, or a value its field refuses, fails
    # here with the field's own message.
    for param in params.values():
        context = representative(param, params)
        for value in param.edge_values():
            if param.kind == "int":
                value = int(value)
            try:
                load_trial_config(apply_overrides(base, [*context.items(), (param.path, value)]))
            except ConfigError as error:
                if error.field.split("[")[0].split(".")[0] in TRIAL_SECTIONS:
                    raise ConfigError(f"search.{param.path}", value, f"{error.field}: {error.allowed}") from None
                raise


def _load_settings(data: Any, params: Mapping[str, SearchParam], multi: bool) -> SweepSettings:
    data = _mapping(data if data is not None else {}, "sweep", "{num_samples: 16, max_concurrent: 2}")
    reject_unknown(data, list(SweepSettings.__dataclass_fields__), lambda key: f"sweep.{key}")
    s = dict(data)
    s["start_points"] = _load_start_points(s.get("start_points", []), params)
    settings = SweepSettings(**s)
    require_int("sweep.num_samples", settings.num_samples, 1)
    require_int("sweep.max_concurrent", settings.max_concurrent, 1)
    require_int("sweep.seed", settings.seed, 0)
    require_int("sweep.grace_period", settings.grace_period, 1)
    require_int("sweep.reduction_factor", settings.reduction_factor, 2)
    require_int("sweep.max_failures", settings.max_failures, 0)
    check(isinstance(settings.baseline, bool), "sweep.baseline", settings.baseline, "true or false")
    check(settings.sampler in SAMPLERS, "sweep.sampler", settings.sampler, f"one of {list(SAMPLERS)}")
    check(settings.scheduler in SCHEDULERS, "sweep.scheduler", settings.scheduler, f"one of {list(SCHEDULERS)}")
    if multi:
        check(settings.sampler in MULTI_OBJECTIVE_SAMPLERS, "sweep.sampler", settings.sampler,
              f"a multi-objective sampler for a list of objectives: one of {list(MULTI_OBJECTIVE_SAMPLERS)}")
    if settings.sampler == "cmaes":
        bad = [p.path for p in params.values() if p.kind == "choice" or p.when]
        check(not bad, "sweep.sampler", "cmaes", f"tpe, gp or random: CMA-ES samples only unconditional numeric parameters (not {bad})")
    resources = _mapping(settings.resources_per_trial, "sweep.resources_per_trial", "{cpu: 1, gpu: 0.5}")
    for key, value in resources.items():
        check(isinstance(key, str), f"sweep.resources_per_trial.{key}", value, "a resource name (cpu, gpu or a custom one)")
        check(is_number(value) and value >= 0 and math.isfinite(value), f"sweep.resources_per_trial.{key}", value, "a number >= 0")
    check(resources.get("cpu", 1) > 0, "sweep.resources_per_trial.cpu", resources.get("cpu"), "a number > 0")
    gpu = resources.get("gpu", 0)
    check(gpu <= 1 or float(gpu).is_integer(), "sweep.resources_per_trial.gpu", gpu, "a fraction of one GPU (0-1) or a whole number of GPUs")
    return settings


def _load_start_points(data: Any, params: Mapping[str, SearchParam]) -> tuple[dict[str, Any], ...]:
    check(isinstance(data, list), "sweep.start_points", data,
          "a list of {parameter: value} mappings, e.g. [{train.lr: 0.05, r2.strength: 0.02}]")
    points = []
    for i, point in enumerate(data):
        where = f"sweep.start_points[{i}]"
        point = _mapping(point, where, "{train.lr: 0.05, r2.strength: 0.02}")
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


def _proxy_for_objective(base: dict[str, Any], trial: TrialConfig, objective: Objective) -> tuple[dict[str, Any], TrialConfig]:
    """Unless the file names one, the per-epoch proxy is the first objective's own result
    (its entry's grid at its bit width; ``fp`` for ``fp/top1``): what ASHA ranks on then
    predicts what the sweep is judged on."""
    if trial.proxy.result is not None or not trial.downstream:
        return base, trial
    result = objective.metric.rsplit("/", 1)[0]
    chosen = result if result in trial.result_names() else PROXY_FP
    base = {**base, "proxy": {**dict(base.get("proxy") or {}), "result": chosen}}
    return base, load_trial_config(base)


def _absolute_root(value: Any) -> Any:
    """A relative ``data.root`` made absolute against the directory the sweep starts in.

    Trials run in their own directories (and on other nodes), so a relative path
    would mean something else there.
    """
    if isinstance(value, str) and value.strip() and not is_uri(value):
        return os.path.abspath(os.path.expanduser(value))
    return value


def load_sweep_spec(data: Any, *, default_name: str = "sweep") -> SweepSpec:
    """Validate a parsed search-space file in full and return the :class:`SweepSpec`.

    Raises:
        ConfigError: naming the first bad field (``search.r2.strength.loguniform``, ...).
    """
    check(isinstance(data, Mapping), "config", type(data).__name__ if data is not None else "an empty file",
          f"a mapping with the sections {list(_TOP_LEVEL)}")
    reject_unknown(data, _TOP_LEVEL, str, what="section")
    name = data.get("name", default_name)
    check(isinstance(name, str) and name.strip() != "" and "/" not in name, "name", name, "a non-empty sweep name without '/'")
    base = {k: v for k, v in data.items() if k in TRIAL_SECTIONS}
    if isinstance(base.get("data"), Mapping) and "root" in base["data"]:
        base["data"] = {**base["data"], "root": _absolute_root(base["data"]["root"])}
    trial = load_trial_config(base)
    objectives = _load_objectives(data.get("objective"), trial)
    base, trial = _proxy_for_objective(base, trial, objectives[0])
    search = _mapping(data.get("search") or {}, "search", "{r2.strength: {loguniform: [1.0e-4, 1.0]}}")
    root_param = search.get("data.root")
    if isinstance(root_param, Mapping) and isinstance(root_param.get("choice"), list):
        search = {**search, "data.root": {**root_param, "choice": [_absolute_root(v) for v in root_param["choice"]]}}
    params: dict[str, SearchParam] = {}
    for path, body in search.items():
        params[path] = _load_param(path, body, params)
    _validate_values(base, params)
    settings = _load_settings(data.get("sweep"), params, len(objectives) > 1)
    spec = SweepSpec(name, base, objectives, tuple(params.values()), settings, trial)
    check_consistency(spec.trial, spec.params, spec.settings, spec.baseline_point)
    return spec

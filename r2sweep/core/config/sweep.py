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

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

from r2sweep.core.config.inputs import with_references
from r2sweep.core.config.consistency import check_consistency, max_epochs, refuse_ineffective_overrides
from r2sweep.core.config.resources import check_resources_per_trial, workers_from_resources
from r2sweep.core.config.overrides import Overrides, apply_overrides, override_pairs
from r2sweep.core.config.search import SearchParam, load_param, load_start_points, mapping_at, validate_values
from r2sweep.core.config.sections import from_dict
from r2sweep.core.config.start_from import StartFrom
from r2sweep.core.config.trial import PROXY_FP, TRIAL_SECTIONS, TrialConfig, load_trial_config, read_yaml
from r2sweep.core.errors import ConfigError, FileConfigError
from r2sweep.core.locations import has_password, is_uri, redact_uri, scheme_of
from r2sweep.core.validate import check, reject_unknown, require_int

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "Objective",
    "SweepSettings",
    "SweepSpec",
    "load_sweep_spec",
]

SAMPLERS = ("tpe", "gp", "cmaes", "random", "nsga2")
SCHEDULERS = ("asha", "none")
MODES = ("max", "min")
# Samplers that handle several objectives (Optuna's multi-objective support).
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "random")
# sweep.sampler_options a sampler takes: what a long search tunes (benchmarks/RESULTS.md,
# TPE's cost): n_startup_trials (random trials before the model), constant_liar (pending
# trials count as bad while they run; Optuna 4 turns it on by default),
# multivariate (false: independent TPE, cheaper per suggestion past thousands of trials).
SAMPLER_OPTIONS = {"tpe": ("n_startup_trials", "constant_liar", "multivariate"), "gp": ("n_startup_trials",)}
#: The pre-training cache's folder in a sweep's storage (``sweep.pretrain_cache: true``).
PRETRAIN_CACHE_FOLDER = "pretrain_cache"
#: The object stores the pre-training cache can live on (besides a folder).
CACHE_URI_SCHEMES = ("s3",)
#: The Optuna study's SQLite file in a sweep's results folder (``sweep.optuna_storage: true``).
OPTUNA_FILE = "optuna.db"
#: The URL schemes (SQLAlchemy dialects, with or without a driver) an Optuna RDB storage takes.
OPTUNA_STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql",
                          "mysql+pymysql", "mysql+mysqldb")
_TOP_LEVEL = ("name", *TRIAL_SECTIONS, "objective", "search", "sweep")


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str = "max"


@dataclass(frozen=True)
class SweepSettings:
    """The ``sweep:`` section, loaded by the strict loader (:func:`~r2sweep.core.config.sections.from_dict`)
    and checked in ``__post_init__``, like every other section. What depends on the search
    (a multi-objective sampler, CMA-ES on choices, start points in the space) is checked by the loader."""

    section: ClassVar[str] = "sweep"

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
    # Ray's runtime environment for the sweep's workers (py_modules, working_dir, pip,
    # env_vars, ...): how the user's code reaches nodes that do not have it installed.
    # A factory module in the working directory is added to py_modules automatically.
    runtime_env: Mapping[str, Any] = field(default_factory=dict)
    # The pre-training cache (r2sweep.core.pretrain_cache): true keeps it in the sweep
    # storage's pretrain_cache/ folder (shared by every sweep of that storage), a path
    # puts it there instead (e.g. one folder for several storages), false turns it off.
    pretrain_cache: Union[bool, str] = True
    # The sweep's trials as an Optuna study (r2sweep.tune.optuna_mirror), for
    # optuna-dashboard and optuna.visualization: true keeps an SQLite file beside the
    # sweep's results (<storage>/<name>/optuna.db), an RDB URL puts it there, false: none.
    optuna_storage: Union[bool, str] = True
    # Keyword options of the sampler (SAMPLER_OPTIONS), e.g. {n_startup_trials: 20, constant_liar: true}.
    sampler_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_int("sweep.num_samples", self.num_samples, 1)
        require_int("sweep.max_concurrent", self.max_concurrent, 1)
        require_int("sweep.seed", self.seed, 0)
        require_int("sweep.grace_period", self.grace_period, 1)
        require_int("sweep.reduction_factor", self.reduction_factor, 2)
        require_int("sweep.max_failures", self.max_failures, 0)
        check(isinstance(self.baseline, bool), "sweep.baseline", self.baseline, "true or false")
        check(self.sampler in SAMPLERS, "sweep.sampler", self.sampler, f"one of {list(SAMPLERS)}")
        check(self.scheduler in SCHEDULERS, "sweep.scheduler", self.scheduler, f"one of {list(SCHEDULERS)}")
        check_resources_per_trial(self.resources_per_trial)
        env = mapping_at(self.runtime_env, "sweep.runtime_env", "{py_modules: [my_pkg], env_vars: {KEY: value}}")
        for key in ("py_modules", "excludes"):
            if key in env:
                value = env[key]
                check(isinstance(value, list) and all(isinstance(v, str) for v in value), f"sweep.runtime_env.{key}",
                      value, "a list of paths (folders or .py files) or URIs")
        if "working_dir" in env:
            check(isinstance(env["working_dir"], str), "sweep.runtime_env.working_dir", env["working_dir"], "a folder's path or a URI")
        cache = self.pretrain_cache
        check(isinstance(cache, bool) or (isinstance(cache, str) and cache.strip() != ""
                                          and scheme_of(cache) in ("", *CACHE_URI_SCHEMES)),
              "sweep.pretrain_cache", cache, "true (in the sweep's storage), false (off), a folder's path every node "
              "mounts, or s3://BUCKET/PREFIX")
        store = self.optuna_storage
        check(isinstance(store, bool) or (isinstance(store, str) and scheme_of(store) in OPTUNA_STORAGE_SCHEMES),
              "sweep.optuna_storage", redact_uri(store) if isinstance(store, str) else store, "true (an SQLite file beside the sweep), false (none), or an RDB URL "
              "(sqlite:///path/optuna.db, postgresql://user@host/db, mysql://...)")
        check(not (isinstance(store, str) and has_password(store)), "sweep.optuna_storage",
              redact_uri(store) if isinstance(store, str) else store,
              "a URL without a password (the sweep file is logged with the sweep): put it in PGPASSWORD or "
              "~/.pgpass for PostgreSQL, ~/.my.cnf for MySQL")
        self._check_sampler_options()

    @property
    def workers(self) -> int:
        """Data-parallel ranks per trial, as ``resources_per_trial`` states them (the trial's ``train.workers``)."""
        return int(self.resources_per_trial.get("workers", 1))

    @property
    def placement(self) -> str:
        return str(self.resources_per_trial.get("placement", "pack"))

    @property
    def rank_resources(self) -> dict[str, float]:
        """What each rank of a trial asks Ray for (``cpu``, ``gpu``, custom resources), zeros left out."""
        return {k: float(v) for k, v in self.resources_per_trial.items()
                if k not in ("workers", "placement") and float(v) > 0}


    def _check_sampler_options(self) -> None:
        options = mapping_at(self.sampler_options, "sweep.sampler_options", "{n_startup_trials: 20, constant_liar: true}")
        known = SAMPLER_OPTIONS.get(self.sampler, ())
        for key, value in options.items():
            where = f"sweep.sampler_options.{key}"
            check(key in known, where, value, f"an option of the {self.sampler} sampler: one of {list(known)}" if known
                  else f"no options for the {self.sampler} sampler (options exist for {list(SAMPLER_OPTIONS)})")
            if key == "n_startup_trials":
                require_int(where, value, 0)
            else:
                check(isinstance(value, bool), where, value, "true or false")


@dataclass(frozen=True)
class SweepSpec:
    """A validated search-space file."""

    name: str
    base: Mapping[str, Any]  # the trial sections as written (the values every trial shares)
    objectives: tuple[Objective, ...]
    params: tuple[SearchParam, ...]
    settings: SweepSettings
    trial: TrialConfig  # the base config, validated
    start_from: StartFrom | None = None  # what an earlier sweep lends (--start-from); not part of the space

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (Tune's saved callbacks, the trainable shipped to workers) as its one record.
        from r2sweep.core.config.record import spec_from_record, sweep_record

        return spec_from_record, (sweep_record(self), self.start_from)

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

    def factory_references(self) -> list[str]:
        """Every ``module:function`` a trial of this sweep may call (the base's, and searched ones)."""
        refs = [r for r in (self.trial.model.factory, self.trial.data.factory) if r]
        for param in self.params:
            if param.path in ("model.factory", "data.factory"):
                refs.extend(str(v) for v in param.values if v)
        return list(dict.fromkeys(refs))

    def identity_params(self) -> dict[str, Any]:
        """Fixed values that say whose code and which weights a trial used, logged with its
        searched values as MLflow params: two checkpoints never look like one experiment."""
        model, data = self.trial.model, self.trial.data
        values = {"model.factory": model.factory, "data.factory": data.factory,
                  "model.init_from": model.init_from, "model.init_from_sha256": model.init_from_sha256}
        searched = {p.path for p in self.params}
        return {k: v for k, v in values.items() if v is not None and k not in searched}

    def shared_paths(self) -> dict[str, list[str]]:
        """Files every node that runs trials must see, by field: ``data.root`` folders, ``model.init_from`` files."""
        paths = {"data.root": self.data_roots(), "model.init_from": [self.trial.model.init_from] if self.trial.model.init_from else []}
        for param in self.params:
            if param.path == "model.init_from":
                paths["model.init_from"].extend(os.path.abspath(str(v)) for v in param.values if v)
        return {k: sorted(set(v)) for k, v in paths.items() if v}

    def data_roots(self) -> list[str]:
        """Every ``data.root`` a trial of this sweep may read (absolute paths)."""
        roots = [self.trial.data.root] if self.trial.data.root else []
        for param in self.params:
            if param.path == "data.root":
                roots.extend(str(v) for v in param.values if v)
        return roots


def _load_objectives(data: Any, trial: TrialConfig) -> tuple[Objective, ...]:
    check(data is not None, "objective", data, "{metric: <a /top1 key>, mode: max} (or a list of them)")
    items = data if isinstance(data, list) else [data]
    check(len(items) > 0, "objective", data, "at least one {metric, mode}")
    produced = trial.objective_names()
    objectives = []
    for i, item in enumerate(items):
        where = "objective" if not isinstance(data, list) else f"objective[{i}]"
        item = mapping_at(item, where, "{metric: ptq_adaround_w2a8/top1, mode: max}")
        check(item.get("metric") is not None, f"{where}.metric", None, f"a metric the trial produces: {produced}")
        objective = from_dict(Objective, item, where)
        check(objective.metric in produced, f"{where}.metric", objective.metric, f"a metric the trial produces: {produced}")
        check(objective.mode in MODES, f"{where}.mode", objective.mode, f"one of {list(MODES)}")
        objectives.append(objective)
    metrics = [o.metric for o in objectives]
    check(len(set(metrics)) == len(metrics), "objective", metrics, "distinct metrics")
    return tuple(objectives)


def _load_settings(data: Any, params: Mapping[str, SearchParam], multi: bool) -> SweepSettings:
    data = dict(mapping_at(data if data is not None else {}, "sweep", "{num_samples: 16, max_concurrent: 2}"))
    if "start_points" in data:  # checked against the search first: from_dict takes them as they are
        data["start_points"] = load_start_points(data["start_points"], params)
    settings = from_dict(SweepSettings, data)
    if multi:
        check(settings.sampler in MULTI_OBJECTIVE_SAMPLERS, "sweep.sampler", settings.sampler,
              f"a multi-objective sampler for a list of objectives: one of {list(MULTI_OBJECTIVE_SAMPLERS)}")
    if settings.sampler == "cmaes":
        bad = [p.path for p in params.values() if p.kind == "choice" or p.when]
        check(not bad, "sweep.sampler", "cmaes", f"tpe, gp or random: CMA-ES samples only unconditional numeric parameters (not {bad})")
    return settings


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


def load_sweep_spec(
    source: str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    overrides: Overrides = None,
    default_name: str | None = None,
) -> SweepSpec:
    """Validate a search-space file (a path, or its parsed mapping) in full and return the :class:`SweepSpec`.

    Args:
        source: a YAML file, read strictly, or the mapping it holds.
        overrides: ``{dotted path: value}``, pairs or ``"PATH=VALUE"`` texts, written in
            before validation (what ``--set`` does); one no trial of the sweep would feel is refused.
        default_name: the sweep's name when the file has no ``name`` (default: the
            file's stem, or ``"sweep"`` for a mapping).

    Raises:
        ConfigError: naming the first bad field (``search.r2.strength.loguniform``, ...);
            a :class:`FileConfigError` naming the file too when ``source`` is a path.

    >>> spec = load_sweep_spec({"objective": {"metric": "fp/top1"}, "search": {"train.lr": {"loguniform": [0.01, 0.1]}}},
    ...                        overrides={"sweep.num_samples": 4})
    >>> spec.name, spec.settings.num_samples, spec.params[0].path
    ('sweep', 4, 'train.lr')
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            return load_sweep_spec(read_yaml(source), overrides=overrides,
                                   default_name=default_name or Path(source).stem)
        except FileConfigError:
            raise
        except ConfigError as error:
            raise FileConfigError(str(source), error) from None
    pairs = override_pairs(overrides)
    data = source
    if pairs:
        data = apply_overrides(data if isinstance(data, Mapping) else {}, pairs)  # a non-mapping is named below
    spec = _load_sweep_spec(data, default_name=default_name or "sweep")
    if pairs:
        refuse_ineffective_overrides(pairs, spec)
    return spec


def _load_sweep_spec(data: Any, *, default_name: str) -> SweepSpec:
    check(isinstance(data, Mapping), "config", type(data).__name__ if data is not None else "an empty file",
          f"a mapping with the sections {list(_TOP_LEVEL)}")
    reject_unknown(data, _TOP_LEVEL, str, what="section")
    name = data.get("name", default_name)
    check(isinstance(name, str) and name.strip() != "" and "/" not in name, "name", name, "a non-empty sweep name without '/'")
    # Callables given from Python become their references: the base is dumped, logged and shipped.
    base = with_references({k: v for k, v in data.items() if k in TRIAL_SECTIONS})
    if isinstance(base.get("data"), Mapping) and "root" in base["data"]:
        base["data"] = {**base["data"], "root": _absolute_root(base["data"]["root"])}
    trial = load_trial_config(base)
    objectives = _load_objectives(data.get("objective"), trial)
    base, trial = _proxy_for_objective(base, trial, objectives[0])
    search = mapping_at(data.get("search") or {}, "search", "{r2.strength: {loguniform: [1.0e-4, 1.0]}}")
    root_param = search.get("data.root")
    if isinstance(root_param, Mapping) and isinstance(root_param.get("choice"), list):
        search = {**search, "data.root": {**root_param, "choice": [_absolute_root(v) for v in root_param["choice"]]}}
    params: dict[str, SearchParam] = {}
    for path, body in search.items():
        params[path] = load_param(path, body, params)
    check("train.workers" not in params, "search.train.workers", search.get("train.workers"),
          "no search: the ranks per trial are fixed for a sweep (sweep.resources_per_trial.workers)")
    settings = _load_settings(data.get("sweep"), params, len(objectives) > 1)
    base, trial = workers_from_resources(base, trial, settings.resources_per_trial)
    validate_values(base, params)
    spec = SweepSpec(name, base, objectives, tuple(params.values()), settings, trial)
    check_consistency(spec.trial, spec.params, spec.settings, spec.baseline_point)
    return spec

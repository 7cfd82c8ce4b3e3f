"""A :class:`~r2sweep.core.config.sweep.SweepSpec`'s search as an Optuna define-by-run function.

Define-by-run makes conditions real: a trial without R2 never samples a
strength, a trial with L-inf never samples a margin, so the sampler's model is
not polluted by values that had no effect. Parameters are sampled in file
order; ``when`` may only name parameters above (checked by the spec), so every
condition can be decided when its parameter comes up.

The function handed to ``OptunaSearch`` must pickle (the searcher's state is
saved in the experiment directory for restores): :func:`make_space` returns a
``functools.partial`` of the module-level :func:`sample`, which does.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from r2sweep.core.config.search import SearchParam
from r2sweep.core.config.sweep import SweepSettings

__all__ = ["sample", "make_space", "make_sampler", "distributions_of"]


def sample(trial: optuna.Trial, params: Sequence[SearchParam]) -> None:
    """Suggest every parameter whose conditions hold, in order (define-by-run)."""
    sampled: dict[str, Any] = {}
    for param in params:
        if not param.applies(sampled):
            continue
        if param.kind == "choice":
            value = trial.suggest_categorical(param.path, list(param.values))
        elif param.kind == "int":
            value = trial.suggest_int(param.path, int(param.values[0]), int(param.values[1]))
        else:
            low, high = param.values
            value = trial.suggest_float(param.path, low, high, log=param.kind == "loguniform")
        sampled[param.path] = value


def distributions_of(params: Sequence[SearchParam]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Each parameter's Optuna distribution, exactly as :func:`sample` suggests it (for trials
    written into a study by hand: history from an earlier sweep, the lasting study)."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for param in params:
        if param.kind == "choice":
            out[param.path] = optuna.distributions.CategoricalDistribution(list(param.values))
        elif param.kind == "int":
            out[param.path] = optuna.distributions.IntDistribution(int(param.values[0]), int(param.values[1]))
        else:
            low, high = param.values
            out[param.path] = optuna.distributions.FloatDistribution(low, high, log=param.kind == "loguniform")
    return out


def make_space(params: Sequence[SearchParam]) -> Callable[[optuna.Trial], None]:
    """The define-by-run function for ``OptunaSearch(space=...)``."""
    return functools.partial(sample, params=tuple(params))


def make_sampler(settings: SweepSettings, multi_objective: bool = False) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler named by ``sweep.sampler``."""
    seed = settings.seed
    options = dict(settings.sampler_options)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is r2sweep's to print
    if settings.sampler == "tpe":
        # multivariate + group: TPE models the conditional parameters jointly
        # within the groups of trials that share a search-space shape.
        chosen = {"multivariate": True, "n_startup_trials": min(8, settings.num_samples // 4 or 1), **options}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, group=chosen["multivariate"], **chosen)
    if settings.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, **options)
    if settings.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)

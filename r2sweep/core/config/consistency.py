"""Checks across fields of a search-space file, made with the rest of the file.

Each constraint here is one that Ray, Optuna or a trial would otherwise find
only after Ray has started and the results folder exists (ASHA's "grace_period
must be <= max_t!", a GPU-less trial asked to train on CUDA), or never (start
points the sweep has no room to run). Every message names both fields and the
way out. Single fields are checked where they are loaded (spec.py); this module
sees the whole spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from r2sweep.core.config.overrides import override_field
from r2sweep.core.config.trial import TrialConfig
from r2sweep.core.errors import ConfigError

__all__ = ["check_consistency", "max_epochs", "representative", "refuse_ineffective_overrides"]


def representative(param: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """Values of the parameters ``param`` depends on that make it apply (first allowed of each)."""
    values: dict[str, Any] = {}
    for name, allowed in param.when:
        values.update(representative(params[name], params))
        values[name] = allowed[0]
    return values


def max_epochs(trial: TrialConfig, params: Sequence[Any]) -> int:
    """The most pre-training epochs a trial of the sweep can run (``train.epochs`` may be searched)."""
    epochs = [trial.train.epochs]
    for param in params:
        if param.path == "train.epochs":
            epochs.extend(int(v) for v in param.values if isinstance(v, (int, float)) and not isinstance(v, bool))
    return max(epochs)


def _check_scheduler(trial: TrialConfig, params: Sequence[Any], settings: Any) -> None:
    if settings.scheduler != "asha":
        return
    epochs = max_epochs(trial, params)
    # A trial reports once per pre-training epoch, then once at its end; ASHA's
    # first rung must come before that end or it can never stop anything (and Ray
    # refuses a grace period past the last report outright).
    if settings.grace_period > epochs:
        raise ConfigError(
            "sweep.grace_period", settings.grace_period,
            f"at most train.epochs ({epochs}) with sweep.scheduler: asha (ASHA's first rung must come before a "
            "trial's last epoch); lower sweep.grace_period, raise train.epochs, or set sweep.scheduler: none",
        )


def _check_device(trial: TrialConfig, params: Sequence[Any], settings: Any) -> None:
    devices = [trial.train.device] + [v for p in params if p.path == "train.device" for v in p.values]
    gpu = settings.resources_per_trial.get("gpu", 0)
    cuda = [d for d in devices if isinstance(d, str) and d.startswith("cuda")]
    # Ray hides every GPU from a trial that asks for none (CUDA_VISIBLE_DEVICES=""),
    # so each such trial would fail at its first tensor.
    if cuda and not gpu:
        raise ConfigError(
            "train.device", cuda[0],
            "'auto' or 'cpu' when sweep.resources_per_trial.gpu is 0 (Ray gives a trial no GPU unless it asks "
            "for one); set sweep.resources_per_trial.gpu (e.g. 1 or 0.5), or train.device: auto",
        )


def _check_start_points(params: Sequence[Any], settings: Any, baseline: Mapping[str, Any] | None) -> None:
    by_path = {p.path: p for p in params}
    for i, point in enumerate(settings.start_points):
        # Fill in what the point leaves out with a value that satisfies the
        # condition, as the sampler would: only the point's own values can break it.
        for path, value in point.items():
            for name, allowed in by_path[path].when:
                if name in point and point[name] not in allowed:
                    raise ConfigError(
                        f"sweep.start_points[{i}].{path}", value,
                        f"a parameter this point can use: search.{path} is sampled only when {name} is one of "
                        f"{list(allowed)}, and the point sets {name}={point[name]!r}; drop {path} from the point",
                    )
    first = len(settings.start_points) + (1 if baseline else 0)
    if settings.num_samples < first:
        raise ConfigError(
            "sweep.num_samples", settings.num_samples,
            f"at least {first}: the trials run first ({'the no-R2 baseline and ' if baseline else ''}"
            f"{len(settings.start_points)} sweep.start_points) must fit; raise sweep.num_samples or drop start points",
        )


def check_consistency(trial: TrialConfig, params: Sequence[Any], settings: Any, baseline: Mapping[str, Any] | None) -> None:
    """Raise a :class:`ConfigError` for the first constraint across fields that the spec breaks."""
    _check_scheduler(trial, params, settings)
    _check_device(trial, params, settings)
    _check_start_points(params, settings, baseline)


def refuse_ineffective_overrides(overrides: list[tuple[str, Any]], spec: Any) -> None:
    """Refuse a ``--set`` that no trial of the sweep would feel.

    A field is without effect in a trial when the search samples it there, or when
    the trial's other settings never read it (:meth:`TrialConfig.unused_fields`).
    The trials looked at: the base config, and one per value of every searched
    choice (with the values its conditions need), since a switch such as
    ``r2.kind`` decides both what is sampled and what is read.

    Raises:
        ConfigError: naming the override, why it has no effect, and the fix.
    """
    params = {p.path: p for p in spec.params}
    # The base config is a trial the search can draw only when no choice is made in every trial.
    always_chosen = any(p.kind == "choice" and not p.when for p in spec.params)
    contexts: list[dict[str, Any]] = [] if always_chosen else [{}]
    for param in spec.params:
        if param.kind == "choice":
            contexts += [{**representative(param, params), param.path: value} for value in param.values]
    for path, value in overrides:
        searched = params.get(path)
        if searched is not None and not searched.when:
            raise ConfigError(
                override_field(path), value,
                f"a field the search leaves alone: search.{path} samples it in every trial, so this value is never "
                f"used; change the distribution instead ({override_field(f'search.{path}.{searched.kind}')}"
                f"=...) or take {path} out of search",
            )
        reasons: list[str | None] = []
        for context in contexts:
            if searched is not None and searched.applies(context):
                reasons.append(f"search.{path} samples it")
                continue
            why = spec.trial_config(context).unused_fields().get(path)
            reasons.append(f"{why} never reads it" if why else None)
        if all(reasons):
            raise ConfigError(override_field(path), value, f"a field some trial of the sweep reads; no trial it "
                              f"can draw uses this value ({'; '.join(sorted(set(reasons)))}): drop the override, "
                              "or change that setting")

"""Which trial is best: one rule, for the selection, every reader and the console.

The rule (a sweep's objectives in order, minimized ones negated, then the higher
``fp/top1`` as the tie-break) is :meth:`SweepSpec.ranking`. Here it is applied:
:func:`ranked` orders finished trials best first, :func:`best_of` takes the
first, and :func:`pareto_front` keeps, for several objectives, the trials no
other one beats on every objective: what ``confirm`` and ``--start-from`` draw
their top trials from. (The best by the rule is always on the front.)

A trial is an MLflow run (``.data.metrics``), a Tune result (``.metrics``) or a
mapping of metrics; callers pass finished trials only (``finished_runs``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from r2sweep.core.config.sweep import SweepSpec

__all__ = ["metrics_of", "ranked", "best_of", "pareto_front", "top"]

T = TypeVar("T")


def metrics_of(trial: Any) -> Mapping[str, float]:
    """A trial's final metrics: an MLflow run's, a Tune result's, or the mapping itself."""
    if isinstance(trial, Mapping):
        return trial
    data = getattr(trial, "data", None)
    return data.metrics if data is not None else trial.metrics


def ranked(trials: Iterable[T], spec: SweepSpec) -> list[T]:
    """``trials`` best first by :meth:`SweepSpec.ranking` (a stable sort: equals keep their order)."""
    return sorted(trials, key=lambda t: spec.ranking(metrics_of(t)), reverse=True)


def best_of(trials: Iterable[T], spec: SweepSpec) -> T | None:
    """The best of ``trials`` by the rule; None when there are none."""
    order = ranked(trials, spec)
    return order[0] if order else None


def _dominates(a: Mapping[str, float], b: Mapping[str, float], spec: SweepSpec) -> bool:
    better_somewhere = False
    for objective in spec.objectives:
        sign = 1 if objective.mode == "max" else -1
        x, y = sign * a[objective.metric], sign * b[objective.metric]
        if x < y:
            return False
        better_somewhere |= x > y
    return better_somewhere


def pareto_front(trials: Iterable[T], spec: SweepSpec) -> list[T]:
    """The trials no other one dominates on every objective (all of them for one objective)."""
    items = list(trials)
    return [t for t in items if not any(_dominates(metrics_of(o), metrics_of(t), spec) for o in items if o is not t)]


def top(trials: Iterable[T], spec: SweepSpec, count: int) -> list[T]:
    """The ``count`` best candidates to try again: for several objectives only the Pareto front (a trial
    another one beats on every objective is not worth a re-run), ranked by the rule."""
    candidates = pareto_front(trials, spec) if spec.multi_objective else list(trials)
    return ranked(candidates, spec)[:count]

"""How a trial ended: decided here, once, for every place that shows or uses it.

The console's progress line, the MLflow run (its ``r2sweep.outcome`` tag and
status), ``best``, ``compare``, ``confirm`` and ``report`` all call
:func:`decide_outcome` (on a live Tune trial's last result) or
:func:`run_outcome` (on an MLflow run read back later), so they cannot disagree.

The outcomes:

* ``finished``: the trial reported a finite value for every objective;
* ``diverged``: pre-training produced a non-finite loss (``diverged``), or the
  downstream result an objective is read from diverged (``<result>/diverged``):
  the trial ran to its end but has nothing to rank;
* ``failed``: the trial raised (Tune marked it ERROR), or ended with a final
  report that lacks an objective for no reason the trial recorded;
* ``stopped``: it ended before its final report (the scheduler stopped it early);
* ``running`` (read back only): no decision recorded yet;
* ``lost``: Tune forgot the trial after a driver crash (set by the tracking).

This module is core: it imports neither Ray, Optuna nor MLflow; an MLflow run is
read through its ``data``/``info`` attributes only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "FINISHED", "STOPPED", "DIVERGED", "FAILED", "RUNNING", "LOST", "OUTCOMES", "RUN_STATUS", "TAG_OUTCOME",
    "decide_outcome", "run_outcome", "finished_runs", "diverged_result",
]

FINISHED, STOPPED, DIVERGED, FAILED, RUNNING, LOST = "finished", "stopped", "diverged", "failed", "running", "lost"
OUTCOMES = (FINISHED, STOPPED, DIVERGED, FAILED, RUNNING, LOST)
#: The MLflow run status each decided outcome ends its run with.
RUN_STATUS = {FINISHED: "FINISHED", STOPPED: "KILLED", DIVERGED: "FAILED", FAILED: "FAILED"}
#: The MLflow tag that records the decision on a trial's run.
TAG_OUTCOME = "r2sweep.outcome"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def diverged_result(metrics: Mapping[str, Any], objectives: Sequence[str]) -> str | None:
    """What diverged, when a trial's divergence explains a missing objective: ``"pre-training"``,
    the downstream result's name (``qat_lsq_w2a2``), or None."""
    if metrics.get("diverged"):
        return "pre-training"
    for metric in objectives:
        result = metric.rsplit("/", 1)[0]
        if not _finite(metrics.get(metric)) and metrics.get(f"{result}/diverged"):
            return result
    return None


def decide_outcome(metrics: Mapping[str, Any] | None, objectives: Sequence[str], *, errored: bool = False) -> str:
    """The outcome of a trial that has ended, from its last reported metrics.

    Args:
        metrics: the trial's last result (the final report carries ``final``).
        objectives: the sweep's objective metrics, all of them (a multi-objective
            trial is finished only with every objective).
        errored: the trial raised (Tune's ERROR status).
    """
    metrics = metrics or {}
    if errored:
        return FAILED
    if all(_finite(metrics.get(metric)) for metric in objectives):
        return FINISHED
    if diverged_result(metrics, objectives) is not None:
        return DIVERGED
    return FAILED if metrics.get("final") else STOPPED


def run_outcome(run: Any, objectives: Sequence[str]) -> str:
    """The outcome of a trial's MLflow run: the tag the sweep recorded, else decided from
    its logged metrics once it has its objectives or has ended, else ``running``."""
    tag = run.data.tags.get(TAG_OUTCOME)
    if tag:
        return tag
    metrics = run.data.metrics
    if run.info.status == "RUNNING" and not all(m in metrics for m in objectives):
        return RUNNING
    return decide_outcome(metrics, objectives, errored=run.info.status == "FAILED" and not metrics.get("diverged"))


def finished_runs(runs: Sequence[Any], objectives: Sequence[str]) -> list[Any]:
    """The MLflow runs whose outcome is ``finished``: the only candidates for best, confirm and the figures."""
    return [run for run in runs if run_outcome(run, objectives) == FINISHED]

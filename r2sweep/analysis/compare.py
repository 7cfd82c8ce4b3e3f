"""``r2sweep compare``: one row per sweep (or per sweep and R2 kind), read from MLflow.

MLflow is the source of truth, so this works for a sweep run on a cluster and
inspected on a laptop, and for sweeps still running. Each row answers what a
person asks after a sweep: how many trials finished, were stopped or failed;
the best objective and the configuration that reached it; that trial's FP
accuracy (what R2 cost); its gain over the best trial without R2 in the same
sweep (what R2 bought); and how long the sweep has taken.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from r2sweep.analysis.select import read_sweep
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import R2SweepError
from r2sweep.core.outcome import DIVERGED, FAILED, STOPPED, finished_runs, run_outcome
from r2sweep.core.ranking import best_of
from r2sweep.tracking.store import SweepRun, Tracker

__all__ = ["ComparisonRow", "compare_sweeps", "summarize_runs", "render", "r2_kind", "FORMATS"]

FORMATS = ("table", "csv", "json")


@dataclass
class ComparisonRow:
    sweep: str
    group: str  # the value of the --by parameter, or "all"
    finished: int
    stopped: int
    failed: int
    objective: str
    best: float | None
    best_trial: str
    best_params: dict[str, str]
    fp_top1: float | None
    gain_over_no_r2: float | None
    wall_s: float
    extra: dict[str, float | None] = field(default_factory=dict)


def r2_kind(run: Any, spec: SweepSpec) -> str:
    """The R2 kind a trial run trained with: its sampled param, else the sweep's fixed kind."""
    return run.data.params.get("r2.kind", spec.trial.r2.kind)


def _signed(value: float, spec: SweepSpec) -> float:
    return value if spec.objective.mode == "max" else -value


def compare_sweeps(
    tracker: Tracker, names: Sequence[str], *, metrics: Sequence[str] = (), by: str | None = None
) -> list[ComparisonRow]:
    """Rows for ``names``, in the order given.

    Raises:
        R2SweepError: a sweep that does not exist or has no trial yet, or a
            ``metrics`` key no trial of any of the sweeps has.
    """
    rows: list[ComparisonRow] = []
    seen_metrics: set[str] = set()
    for name in names:
        sweep, spec = read_sweep(tracker, name)
        runs = sweep.trial_runs()
        for run in runs:
            seen_metrics.update(run.data.metrics)
        rows += summarize_runs(sweep, spec, runs, metrics=metrics, by=by)
    missing = [m for m in metrics if m not in seen_metrics]
    if missing:
        raise R2SweepError(f"--metric {missing[0]!r}: no trial of {list(names)} has it")
    return rows


def summarize_runs(
    sweep: SweepRun, spec: SweepSpec, runs: Sequence[Any], *, metrics: Sequence[str] = (), by: str | None = None
) -> list[ComparisonRow]:
    """The rows of one sweep whose trial runs the caller has already read (the report
    reads them once for its figures and its tables)."""
    if not runs:
        raise R2SweepError(f"sweep {sweep.name!r} has no trials yet")
    objective = spec.objective.metric
    finished = finished_runs(runs, spec.objective_metrics)
    no_r2 = [r.data.metrics[objective] for r in finished if r2_kind(r, spec) == "none"]
    best_no_r2 = max(no_r2, key=lambda v: _signed(v, spec)) if no_r2 else None
    parent = sweep.tracker.client.get_run(sweep.parent_run_id).info
    wall_s = ((parent.end_time or int(time.time() * 1000)) - parent.start_time) / 1000
    groups: dict[str, list[Any]] = {"all": list(runs)}
    if by:
        groups = {}
        for run in runs:
            key = run.data.params.get(by, r2_kind(run, spec) if by == "r2.kind" else "-")
            groups.setdefault(key, []).append(run)
    rows = []
    for group, members in sorted(groups.items()):
        done = finished_runs(members, spec.objective_metrics)
        best = best_of(done, spec)
        value = best.data.metrics[objective] if best else None
        outcomes = [run_outcome(r, spec.objective_metrics) for r in members]
        rows.append(ComparisonRow(
            sweep=sweep.name,
            group=group,
            finished=len(done),
            stopped=outcomes.count(STOPPED),
            failed=sum(o in (FAILED, DIVERGED) for o in outcomes),
            objective=objective,
            best=value,
            best_trial=best.data.tags.get("r2sweep.trial_id", "") if best else "",
            best_params=dict(best.data.params) if best else {},
            fp_top1=best.data.metrics.get("fp/top1") if best else None,
            gain_over_no_r2=(value - best_no_r2) if value is not None and best_no_r2 is not None else None,
            wall_s=wall_s,
            extra={m: best.data.metrics.get(m) if best else None for m in metrics},
        ))
    return rows


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _params(params: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def render(rows: Sequence[ComparisonRow], fmt: str = "table") -> str:
    """Rows as an aligned table for a terminal, or CSV, or JSON."""
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=1)
    extra = list(rows[0].extra) if rows else []
    header = ["sweep", "group", "finished", "stopped", "failed", "objective", "best", "fp/top1",
              "gain_vs_no_r2", "wall_s", *extra, "best_trial", "best_config"]
    table = [[r.sweep, r.group, str(r.finished), str(r.stopped), str(r.failed), r.objective, _number(r.best),
              _number(r.fp_top1), ("+" if (r.gain_over_no_r2 or 0) > 0 else "") + _number(r.gain_over_no_r2),
              f"{r.wall_s:.0f}", *[_number(r.extra[m]) for m in extra], r.best_trial, _params(r.best_params)]
             for r in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table)
        return out.getvalue()
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:-1], widths)) + "  " + header[-1]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    return "\n".join(lines)

"""What an earlier sweep lends a new one (``--start-from``): configurations to try first, and history.

Built from MLflow by :func:`r2sweep.analysis.start_from.start_from`; read by the
searcher (:func:`r2sweep.tune.search.tune_config`). It is not part of the search
space a resume checks: the points are spent once the sweep has started, and the
searcher's saved state keeps the history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["StartFrom", "HistoryTrial"]


@dataclass(frozen=True)
class HistoryTrial:
    """One earlier trial as Optuna should know it: its sampled values and objective values
    (None: it ended without them, stopped early or diverged; Optuna records it PRUNED)."""

    params: Mapping[str, Any]
    values: tuple[float, ...] | None


@dataclass(frozen=True)
class StartFrom:
    """``points``: the earlier sweep's best configurations mapped onto this sweep's space, best
    first, tried before anything is sampled. ``history``: every earlier trial, given to Optuna
    before it samples; only when the two sweeps search the same space for the same objectives
    (else empty). ``notes``: what was dropped or refused, and why."""

    source: str
    top: int
    points: tuple[Mapping[str, Any], ...]
    history: tuple[HistoryTrial, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: what the new sweep takes from the earlier one."""
        history = f"; its {len(self.history)} trials given to Optuna as history" if self.history else ""
        return (f"start from sweep {self.source}: its top {len(self.points)} configuration(s) first"
                f" (of --top {self.top}){history}")

"""``--start-from``: an earlier sweep's best configurations, mapped onto a new sweep's space.

Read from MLflow (so the earlier sweep may have run anywhere). The earlier sweep's
finished trials are ranked by its own objectives (the rule of ``r2sweep best``); the
top ``K`` become the new sweep's first trials, keeping only the values of parameters
both sweeps search:

* a parameter only the earlier sweep searched is left out (one note names them);
* a value outside this sweep's range or choices refuses that configuration (a note
  says which value and why), rather than trying something else under its name;
* a value whose condition does not hold here is left out (the sampler would not
  have drawn it either); what the new sweep searches besides is sampled.

When both sweeps search exactly the same space for the same objectives, every earlier
trial also goes to Optuna as history before it samples, so the sampler starts from
what is known instead of from random draws.
"""

from __future__ import annotations

from typing import Any

from r2sweep.analysis.select import read_sweep
from r2sweep.analysis.trials import logged_value
from r2sweep.core.config.search import SearchParam, load_start_points
from r2sweep.core.config.start_from import HistoryTrial, StartFrom
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import ConfigError, R2SweepError
from r2sweep.core.outcome import DIVERGED, FINISHED, STOPPED, finished_runs, run_outcome
from r2sweep.core.ranking import top as top_trials
from r2sweep.tracking.store import TAG_TRIAL_ID, Tracker

__all__ = ["start_from"]


def start_from(tracker: Tracker, earlier_name: str, spec: SweepSpec, top: int, *,
               field: str = "start_from") -> StartFrom:
    """What sweep ``earlier_name`` lends ``spec``: its ``top`` configurations mapped, and history.

    Raises:
        ConfigError: naming ``field``: no such sweep, none of its trials finished, or the two
            sweeps search no parameter in common.
    """
    try:
        sweep, earlier = read_sweep(tracker, earlier_name)
    except R2SweepError as error:
        raise ConfigError(field, earlier_name, f"a sweep in the tracking store ({error})") from None
    searched = {p.path: p for p in spec.params}
    theirs = {p.path: p for p in earlier.params}
    common = [path for path in searched if path in theirs]
    if not common:
        raise ConfigError(field, earlier_name, f"a sweep that searches some of this one's parameters ({earlier_name} "
                                               f"searches {sorted(theirs)}; this one {sorted(searched)})")
    runs = sweep.trial_runs()
    finished = finished_runs(runs, earlier.objective_metrics)
    if not finished:
        raise ConfigError(field, earlier_name, "a sweep with a finished trial (it has none yet)")
    ranked = top_trials(finished, earlier, len(finished))
    room = spec.settings.num_samples - len(spec.settings.start_points) - (1 if spec.baseline_point else 0)
    notes: list[str] = []
    left_out = sorted(set(theirs) - set(searched))
    if left_out:
        notes.append(f"not searched here, so left out: {', '.join(left_out)}")
    points: list[dict[str, Any]] = []
    for run in ranked[:top]:
        trial = run.data.tags.get(TAG_TRIAL_ID, run.info.run_id)
        sampled = {path: value for path in common
                   if (value := _logged(theirs[path], run.data.params.get(path))) is not None}
        point, dropped = _applicable(sampled, spec.params)
        if dropped:
            notes.append(f"trial {trial}: {', '.join(dropped)} left out (its condition does not hold here)")
        if not point or point in points:
            continue
        try:
            load_start_points([point], searched)
        except ConfigError as error:
            notes.append(f"trial {trial} not tried: {error.field.split('.', 2)[-1]}={error.value!r} is not "
                         f"{error.allowed}")
            continue
        if len(points) == room:
            notes.append(f"only {room} configuration(s) fit before sweep.num_samples={spec.settings.num_samples}")
            break
        points.append(point)
    history = _history(runs, earlier, spec) if _same_space(earlier, spec) else ()
    return StartFrom(source=earlier_name, top=top, points=tuple(points), history=history, notes=tuple(notes))


def _logged(param: SearchParam, text: str | None) -> Any:
    return None if text is None else logged_value(param, text)


def _applicable(sampled: dict[str, Any], params: tuple[SearchParam, ...]) -> tuple[dict[str, Any], list[str]]:
    """The values whose conditions hold, in file order (conditions name parameters above), and the rest."""
    kept: dict[str, Any] = {}
    dropped = []
    for param in params:
        if param.path not in sampled:
            continue
        if param.applies(kept):
            kept[param.path] = sampled[param.path]
        else:
            dropped.append(param.path)
    return kept, dropped


def _same_space(earlier: SweepSpec, spec: SweepSpec) -> bool:
    return earlier.params == spec.params and earlier.objectives == spec.objectives


def _history(runs: list[Any], earlier: SweepSpec, spec: SweepSpec) -> tuple[HistoryTrial, ...]:
    """Every earlier trial that ended with a decision Optuna records: finished (its values),
    stopped or diverged (PRUNED). Failed and running ones are left out."""
    params = {p.path: p for p in spec.params}
    history = []
    for run in runs:
        outcome = run_outcome(run, earlier.objective_metrics)
        if outcome not in (FINISHED, STOPPED, DIVERGED):
            continue
        sampled = {path: value for path, p in params.items()
                   if (value := _logged(p, run.data.params.get(path))) is not None}
        values = tuple(float(run.data.metrics[m]) for m in spec.objective_metrics) if outcome == FINISHED else None
        history.append(HistoryTrial(params=sampled, values=values))
    return tuple(history)

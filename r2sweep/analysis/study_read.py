"""A study's table read back from MLflow: per sweep its confirmed winner, its re-runs and its controls.

Nothing here is kept anywhere but in MLflow, so the table of a study whose sweeps ran
on a cluster can be rebuilt on any machine that reaches the store
(:mod:`r2sweep.analysis.study_table` does the arithmetic).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from r2sweep.analysis.confirm import TAG_CONFIRM_OF, TAG_CONFIRMED_BEST
from r2sweep.analysis.select import read_sweep
from r2sweep.analysis.study_table import CONTROL_ON_BASELINE, CONTROL_R2_OFF, PARAM_BASELINE_TRIAL, Reruns, StudyRow, StudyTable
from r2sweep.core.config.study import StudySpec, StudySweep
from r2sweep.core.errors import R2SweepError
from r2sweep.core.outcome import DIVERGED, FINISHED, finished_runs, run_outcome
from r2sweep.tracking.names import TAG_CONTROL, TAG_CONTROL_OF, TAG_TRIAL_ID
from r2sweep.tracking.store import Tracker

__all__ = ["read_study_table"]


def _by_seed(runs: Iterable[Any], objectives: Sequence[str], seeds: Sequence[int]) -> Reruns:
    """Finished (or diverged) re-runs on the study's seeds: a seed run outside them (an earlier
    ``r2sweep confirm`` of the user's) is not the study's."""
    wanted = {int(s) for s in seeds}
    chosen: dict[int, dict[str, float]] = {}
    for run in runs:
        seed = int(run.data.params.get("seed", -1))
        if seed in wanted and run_outcome(run, objectives) in (FINISHED, DIVERGED):
            chosen[seed] = dict(run.data.metrics)
    return Reruns(chosen)


def _row(tracker: Tracker, sweep: StudySweep, seeds: Sequence[int], baseline_trial: str = "") -> StudyRow:
    """The sweep's row; a kind without a winner gets an empty row saying why (the baseline must have one).

    ``baseline_trial``: the baseline's winner; an r2_on_baseline control counts only if it took
    that winner's knobs (an earlier winner's, before ``confirm.top`` was raised, does not)."""
    name, kind = sweep.name, sweep.kind

    def missing(why: str) -> StudyRow:
        if kind == "none":
            raise R2SweepError(f"the study's baseline sweep {name!r} {why}: the study has no answer yet "
                               "(run it again to go on)")
        return StudyRow(kind=kind, sweep=name, trial_id="", run_id="", params={}, reruns=Reruns({}), missing=why,
                        replicate=sweep.replicate)

    if tracker.find_sweep(name) is None:
        return missing("has not run yet")
    run, spec = read_sweep(tracker, name)
    winner = tracker.client.get_run(run.parent_run_id).data.tags.get(TAG_CONFIRMED_BEST)
    if winner is None:
        if not finished_runs(run.trial_runs(), spec.objective_metrics):
            return missing("has no finished trial")
        if any(r.data.tags.get(TAG_CONFIRM_OF) for r in run.confirm_runs()):
            return missing("its best diverged on every confirmation seed")
        return missing("has no confirmed winner yet")
    trial = next((r for r in run.trial_runs() if r.data.tags.get(TAG_TRIAL_ID) == winner), None)
    if trial is None:
        raise R2SweepError(f"sweep {name!r}: its confirmed winner {winner!r} is not among its trial runs")
    confirm_runs = run.confirm_runs()
    objectives = spec.objective_metrics
    row = StudyRow(kind=kind, sweep=name, trial_id=winner, run_id=trial.info.run_id, params=dict(trial.data.params),
                   reruns=_by_seed([r for r in confirm_runs if r.data.tags.get(TAG_CONFIRM_OF) == winner], objectives,
                                   seeds), replicate=sweep.replicate)
    for control in (CONTROL_R2_OFF, CONTROL_ON_BASELINE):
        runs = [r for r in confirm_runs
                if r.data.tags.get(TAG_CONTROL) == control and r.data.tags.get(TAG_CONTROL_OF) == winner
                and (control != CONTROL_ON_BASELINE or r.data.params.get(PARAM_BASELINE_TRIAL) == baseline_trial)]
        if runs:
            row.controls[control] = _by_seed(runs, objectives, seeds)
    row.objective = row.reruns.over_seeds(spec.objective.metric)
    row.fp = row.reruns.over_seeds("fp/top1")
    return row


def read_study_table(tracker: Tracker, study: StudySpec) -> StudyTable:
    """The study's table from MLflow alone.

    A kind whose sweep has not run, or has no finished trial, gets a row saying so.

    Raises:
        R2SweepError: a baseline's sweep is missing or not confirmed yet.
    """
    objective = study.baseline.spec.objective
    replicates = []
    for sweeps in study.replicate_sweeps:
        base = _row(tracker, sweeps[0], study.seeds)
        replicates.append([base, *(_row(tracker, s, study.seeds, base.trial_id) for s in sweeps[1:])])
    return StudyTable.build(study.name, objective.metric, objective.mode, study.seeds, replicates)

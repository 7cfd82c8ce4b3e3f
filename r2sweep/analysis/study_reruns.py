"""A study's re-runs after its sweeps: every sweep's winner confirmed on fresh seeds, then the controls.

Both stages are ordinary confirm runs of the sweeps (:func:`r2sweep.analysis.confirm.run_reruns`):
logged to MLflow under the sweep they belong to, and never run twice, so an
interrupted study picks up where it stopped. The controls ask whether a kind's gain
is R2's or its sweep's training knobs:

* ``r2_off``: the kind's winner with R2 switched off, on the same seeds (same knobs,
  no R2 term): what the R2 term itself adds;
* ``r2_on_baseline``: the tuned baseline's configuration with the kind winner's R2
  section added: what R2 adds to the recipe the user already has.
"""

from __future__ import annotations

from collections.abc import Callable

from r2sweep.analysis.confirm import TAG_CONFIRMED_BEST, Rerun, confirm_top, logged_trial_config, run_reruns
from r2sweep.analysis.select import read_sweep
from r2sweep.analysis.study_table import CONTROL_ON_BASELINE, CONTROL_R2_OFF, PARAM_BASELINE_TRIAL
from r2sweep.core.config.study import StudySpec, StudySweep
from r2sweep.core.errors import R2SweepError
from r2sweep.core.outcome import finished_runs
from r2sweep.tracking.names import TAG_CONTROL, TAG_CONTROL_OF, TAG_TRIAL_ID
from r2sweep.tracking.runs import SweepRun
from r2sweep.tracking.store import Tracker

__all__ = ["confirm_winners", "run_controls"]


def confirm_winners(tracker: Tracker, study: StudySpec, *, address: str | None, num_cpus: int | None,
                    progress: Callable[[str], None], storage: str | None = None) -> None:
    """Re-run each sweep's ``confirm.top`` best trials on the study's seeds; the best mean becomes its winner.

    A kind's sweep without a finished trial (every one diverged) is left out of the answer, with a line.
    """
    for sweep in study.sweeps:
        if sweep.kind != "none" and not _has_finished_trial(tracker, sweep.name):
            progress(f"{sweep.name}: no finished trial to confirm; this kind is left out of the answer")
            continue
        confirm_top(tracker, sweep.name, top=study.confirm_top, seeds=study.seeds, address=address,
                    num_cpus=num_cpus, progress=progress, storage=storage)


def _has_finished_trial(tracker: Tracker, name: str) -> bool:
    sweep, spec = read_sweep(tracker, name)
    return bool(finished_runs(sweep.trial_runs(), spec.objective_metrics))


def _winner(tracker: Tracker, name: str) -> tuple[SweepRun, str, dict[str, str], str] | None:
    """(the sweep, its confirmed winner's trial id, searched values, run id); None without one
    (no finished trial, or every re-run of its best diverged)."""
    sweep, _ = read_sweep(tracker, name)
    trial_id = tracker.client.get_run(sweep.parent_run_id).data.tags.get(TAG_CONFIRMED_BEST)
    run = next((r for r in sweep.trial_runs() if r.data.tags.get(TAG_TRIAL_ID) == trial_id), None)
    if trial_id is None or run is None:
        return None
    return sweep, trial_id, dict(run.data.params), run.info.run_id


def _on_baseline_key(sweep: SweepRun, trial_id: str, base_id: str) -> str:
    """The re-run key of ``trial_id``'s R2 on the baseline winner ``base_id``'s knobs.

    The baseline's winner is part of it: raising ``confirm.top`` can change that winner,
    and the control must then run again on the new one. Studies before this keyed it by
    the kind's winner alone; their runs made on the same baseline winner still count.
    """
    earlier = f"{CONTROL_ON_BASELINE}-{trial_id}"
    if any(r.data.tags.get(TAG_TRIAL_ID, "").startswith(f"{earlier}-seed")
           and r.data.params.get(PARAM_BASELINE_TRIAL) == base_id for r in sweep.confirm_runs()):
        return earlier
    return f"{earlier}-on-{base_id}"


def run_controls(tracker: Tracker, study: StudySpec, *, address: str | None, num_cpus: int | None,
                 progress: Callable[[str], None], storage: str | None = None) -> None:
    """For each kind of each replicate: its winner with R2 off, and its replicate's baseline winner
    with its R2, on the study's seeds."""
    for sweeps in study.replicate_sweeps:
        _replicate_controls(tracker, study, sweeps[0], sweeps[1:], address=address, num_cpus=num_cpus,
                            progress=progress, storage=storage)


def _replicate_controls(tracker: Tracker, study: StudySpec, baseline: StudySweep, kinds: tuple[StudySweep, ...], *,
                        address: str | None, num_cpus: int | None, progress: Callable[[str], None],
                        storage: str | None) -> None:
    base = _winner(tracker, baseline.name)
    if base is None:
        raise R2SweepError(f"the baseline sweep {baseline.name!r} has no confirmed winner (every re-run of its "
                           "best trials diverged?): there is nothing to compare R2 against")
    base_sweep, base_id, base_params, base_run = base
    for kind in kinds:
        winner = _winner(tracker, kind.name)
        if winner is None:
            continue  # left out of the answer (confirm_winners said so)
        sweep, trial_id, params, run_id = winner
        _, spec = read_sweep(tracker, kind.name)
        tags = {TAG_CONTROL_OF: trial_id}
        r2_params = {k: v for k, v in params.items() if k.startswith("r2.")}

        def r2_off(sweep: SweepRun = sweep, run_id: str = run_id) -> dict:
            return {**logged_trial_config(sweep, run_id), "r2": {"kind": "none"}}

        def on_baseline(sweep: SweepRun = sweep, run_id: str = run_id) -> dict:
            return {**logged_trial_config(base_sweep, base_run), "r2": logged_trial_config(sweep, run_id)["r2"]}

        reruns = [
            Rerun(key=f"{CONTROL_R2_OFF}-{trial_id}", config=r2_off,
                  params={**{k: v for k, v in params.items() if not k.startswith("r2.")}, "r2.kind": "none"},
                  tags={**tags, TAG_CONTROL: CONTROL_R2_OFF}),
            Rerun(key=_on_baseline_key(sweep, trial_id, base_id), config=on_baseline,
                  params={**base_params, **r2_params, "r2.kind": kind.kind, PARAM_BASELINE_TRIAL: base_id},
                  tags={**tags, TAG_CONTROL: CONTROL_ON_BASELINE}),
        ]
        run_reruns(sweep, spec, reruns, study.seeds, address=address, num_cpus=num_cpus,
                   label=f"controls {kind.name}", what="controls", progress=progress, storage=storage)

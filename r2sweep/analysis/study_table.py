"""A study's answer, read back from MLflow: each sweep's confirmed winner, its controls, the gains.

Nothing here is kept anywhere but in MLflow, so the table of a study whose sweeps ran
on a cluster can be rebuilt on any machine that reaches the store. Per sweep of the
study (:mod:`r2sweep.core.config.study`):

* the **winner**: the trial ``r2sweep confirm`` ranked first on its re-runs' mean
  (the parent run's ``r2sweep.confirmed_best_trial`` tag), and those re-runs
  (``r2sweep.confirm_of`` = the winner), one per seed of the study;
* for an R2 kind, the **controls** (``r2sweep.control``, ``r2sweep.control_of`` =
  the winner): ``r2_off``, the winner's configuration with R2 switched off, and
  ``r2_on_baseline``, the tuned baseline's configuration with the winner's R2 added.

The gains are differences of means over seeds, each with the standard error of that
difference (``sqrt(sd_a^2/n_a + sd_b^2/n_b)``); a gain is *clear* when it exceeds
twice its uncertainty, in the direction the objective improves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from r2sweep.analysis.confirm import TAG_CONFIRM_OF, TAG_CONFIRMED_BEST
from r2sweep.analysis.select import read_sweep
from r2sweep.core.config.study import StudySpec
from r2sweep.core.errors import R2SweepError
from r2sweep.core.outcome import DIVERGED, FINISHED, finished_runs, run_outcome
from r2sweep.tracking.names import TAG_CONTROL, TAG_CONTROL_OF, TAG_TRIAL_ID
from r2sweep.tracking.store import Tracker

__all__ = ["OverSeeds", "Gain", "StudyRow", "StudyTable", "read_study_table", "CONTROL_R2_OFF", "CONTROL_ON_BASELINE",
           "PARAM_BASELINE_TRIAL"]

CONTROL_R2_OFF = "r2_off"  # the kind's winner, R2 switched off: what R2 itself adds at those knobs
CONTROL_ON_BASELINE = "r2_on_baseline"  # the tuned baseline, the winner's R2 added: what R2 adds to my recipe
PARAM_BASELINE_TRIAL = "baseline_trial"  # on an r2_on_baseline control: the baseline winner whose knobs it took
#: A winner whose FP top-1 spans more points than this over the seeds has a pre-training that
#: fails on some seeds. Working recipes spread by a few points here (the recorded studies' FP
#: sd was at most 3); the ptq-mbv2 re-run's baseline winner spanned 35.7 to 88.3.
FRAGILE_FP_SPAN = 10.0


@dataclass(frozen=True)
class OverSeeds:
    """One metric of one configuration, a value per seed (seeds where it is missing left out)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        return f"{self.mean:.1f} +- {self.sd:.1f}" if self.values else "-"


@dataclass(frozen=True)
class Gain:
    """``after`` minus ``before`` in means, with the standard error of that difference."""

    delta: float
    se: float
    clear: bool  # beyond twice its uncertainty, in the objective's better direction (never from one seed)

    @classmethod
    def of(cls, after: OverSeeds, before: OverSeeds, sign: int) -> Gain | None:
        if not after.values or not before.values:
            return None
        se = math.sqrt(after.sd**2 / after.n + before.sd**2 / before.n)
        delta = after.mean - before.mean
        return cls(delta, se, clear=min(after.n, before.n) > 1 and sign * delta > 2 * se)

    def text(self) -> str:
        return f"{self.delta:+.1f} +- {self.se:.1f}" + (" (clear)" if self.clear else "")


@dataclass(frozen=True)
class Reruns:
    """One configuration's re-runs: final metrics by seed."""

    by_seed: Mapping[int, Mapping[str, float]]

    def over_seeds(self, metric: str) -> OverSeeds:
        return OverSeeds(tuple(m[metric] for _, m in sorted(self.by_seed.items()) if metric in m))


@dataclass
class StudyRow:
    """One sweep of the study: its confirmed winner, the winner's re-runs, and (for a kind) its controls."""

    kind: str  # "none" for the tuned baseline
    sweep: str
    trial_id: str  # the confirmed winner
    run_id: str  # the winner's trial run in its sweep (its weights, its trial_config.yaml)
    params: dict[str, str]  # the winner's searched values
    reruns: Reruns
    controls: dict[str, Reruns] = field(default_factory=dict)  # CONTROL_* -> re-runs
    objective: OverSeeds = OverSeeds(())
    fp: OverSeeds = OverSeeds(())
    gain: Gain | None = None  # over the tuned baseline
    gain_over_r2_off: Gain | None = None  # over the same knobs with R2 off
    gain_on_baseline: Gain | None = None  # the baseline's knobs with this R2, over the baseline
    fp_change: float | None = None
    missing: str = ""  # why a kind has no winner (its sweep not run yet, or no trial of it finished)

    @property
    def label(self) -> str:
        return "none (tuned baseline)" if self.kind == "none" else self.kind


@dataclass
class StudyTable:
    """The study's answer: one row per sweep (the baseline first) and the recommendation."""

    name: str
    objective: str
    mode: str
    seeds: tuple[int, ...]
    rows: list[StudyRow]
    recommended: StudyRow

    @property
    def baseline(self) -> StudyRow:
        return self.rows[0]

    def verdict(self) -> str:
        """One sentence: what to ship, and what it buys."""
        pick, base = self.recommended, self.baseline
        seeds = f"seeds {list(self.seeds)}"
        if pick.kind == "none":
            kinds = [r for r in self.rows[1:] if r.gain is not None]
            closest = max(kinds, key=lambda r: (1 if self.mode == "max" else -1) * r.gain.delta, default=None)
            also = f"; the closest kind, {closest.kind}: {closest.gain.text()}" if closest is not None else ""
            return (f"ship the tuned baseline without R2: no R2 kind beat its {self.objective} "
                    f"{base.objective.text()} over {seeds}{also}")
        assert pick.gain is not None
        sure = "clear: more than twice its uncertainty" if pick.gain.clear else "inside its uncertainty: not clear"
        fp = f"; FP {pick.fp_change:+.1f}" if pick.fp_change is not None else ""
        return (f"ship R2 {pick.kind}: {self.objective} {pick.objective.text()} over {seeds}, "
                f"{pick.gain.text().removesuffix(' (clear)')} over the tuned baseline ({sure}){fp}")

    def warnings(self) -> list[str]:
        """What makes the answer weaker than its numbers say: a winner whose pre-training fails
        on some seeds (its FP spans more than :data:`FRAGILE_FP_SPAN` points over them)."""
        found = []
        for row in self.rows:
            if row.missing or row.fp.n < 2 or max(row.fp.values) - min(row.fp.values) <= FRAGILE_FP_SPAN:
                continue
            against = ("every gain here is measured against it" if row.kind == "none"
                       else "its gains rest on the seeds where it trained")
            found.append(f"{row.label}: its winner {row.trial_id} is fragile: FP {min(row.fp.values):.1f} to "
                         f"{max(row.fp.values):.1f} over the seeds (its pre-training fails on some), and {against}; "
                         "re-run more of each sweep's best (confirm.top) so a steadier configuration can win")
        return found

    def markdown(self) -> str:
        """The table as Markdown (the study page and the command line show the same)."""
        lines = [f"| R2 | {self.objective} (mean +- sd) | gain over the tuned baseline | gain over R2 off at the "
                 "winner's knobs | R2 on the baseline's knobs: gain | fp/top1 | FP change | winner (searched values) |",
                 "|---|---|---|---|---|---|---|---|"]
        for row in self.rows:
            if row.missing:
                lines.append(f"| {row.label} | {row.missing} |" + " - |" * 6)
                continue
            cells = [row.label + (" **recommended**" if row is self.recommended else ""),
                     f"{row.objective.text()} (n={row.objective.n})",
                     row.gain.text() if row.gain else "-",
                     row.gain_over_r2_off.text() if row.gain_over_r2_off else "-",
                     row.gain_on_baseline.text() if row.gain_on_baseline else "-",
                     row.fp.text(),
                     f"{row.fp_change:+.1f}" if row.fp_change is not None else "-",
                     f"{row.trial_id}: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(row.params.items()))]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


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


def _row(tracker: Tracker, name: str, kind: str, seeds: Sequence[int], baseline_trial: str = "") -> StudyRow:
    """The sweep's row; a kind without a winner gets an empty row saying why (the baseline must have one).

    ``baseline_trial``: the baseline's winner; an r2_on_baseline control counts only if it took
    that winner's knobs (an earlier winner's, before ``confirm.top`` was raised, does not)."""
    def missing(why: str) -> StudyRow:
        if kind == "none":
            raise R2SweepError(f"the study's baseline sweep {name!r} {why}: the study has no answer yet "
                               "(run it again to go on)")
        return StudyRow(kind=kind, sweep=name, trial_id="", run_id="", params={}, reruns=Reruns({}), missing=why)

    if tracker.find_sweep(name) is None:
        return missing("has not run yet")
    sweep, spec = read_sweep(tracker, name)
    winner = tracker.client.get_run(sweep.parent_run_id).data.tags.get(TAG_CONFIRMED_BEST)
    if winner is None:
        if not finished_runs(sweep.trial_runs(), spec.objective_metrics):
            return missing("has no finished trial")
        if any(r.data.tags.get(TAG_CONFIRM_OF) for r in sweep.confirm_runs()):
            return missing("its best diverged on every confirmation seed")
        return missing("has no confirmed winner yet")
    trial = next((r for r in sweep.trial_runs() if r.data.tags.get(TAG_TRIAL_ID) == winner), None)
    if trial is None:
        raise R2SweepError(f"sweep {name!r}: its confirmed winner {winner!r} is not among its trial runs")
    confirm_runs = sweep.confirm_runs()
    objectives = spec.objective_metrics
    row = StudyRow(kind=kind, sweep=name, trial_id=winner, run_id=trial.info.run_id, params=dict(trial.data.params),
                   reruns=_by_seed([r for r in confirm_runs if r.data.tags.get(TAG_CONFIRM_OF) == winner], objectives,
                                   seeds))
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
        R2SweepError: the baseline's sweep is missing or not confirmed yet.
    """
    objective = study.baseline.spec.objective
    sign = 1 if objective.mode == "max" else -1
    base = _row(tracker, study.baseline.name, "none", study.seeds)
    rows = [base, *(_row(tracker, s.name, s.kind, study.seeds, base.trial_id) for s in study.kinds)]
    for row in rows[1:]:
        row.gain = Gain.of(row.objective, base.objective, sign)
        if base.fp.values and row.fp.values:
            row.fp_change = row.fp.mean - base.fp.mean
        if CONTROL_R2_OFF in row.controls:
            row.gain_over_r2_off = Gain.of(row.objective, row.controls[CONTROL_R2_OFF].over_seeds(objective.metric), sign)
        if CONTROL_ON_BASELINE in row.controls:
            row.gain_on_baseline = Gain.of(row.controls[CONTROL_ON_BASELINE].over_seeds(objective.metric),
                                           base.objective, sign)
    scored = [r for r in rows if r.objective.values]
    if not scored:
        raise R2SweepError(f"study {study.name!r}: every re-run of every winner diverged or failed; nothing to recommend")
    # The best mean wins; on a tie the baseline (listed first) stays: R2 must earn its place.
    recommended = max(scored, key=lambda r: sign * r.objective.mean)
    return StudyTable(name=study.name, objective=objective.metric, mode=objective.mode, seeds=study.seeds, rows=rows,
                      recommended=recommended)

"""A study's answer: per sweep its confirmed winner, its controls and gains; per arm, over the searches.

Per sweep of the study (:mod:`r2sweep.core.config.study`; read from MLflow by
:mod:`r2sweep.analysis.study_read`):

* the **winner**: the trial ``r2sweep confirm`` ranked first on its re-runs' mean
  (the parent run's ``r2sweep.confirmed_best_trial`` tag), and those re-runs
  (``r2sweep.confirm_of`` = the winner), one per seed of the study;
* for an R2 kind, the **controls** (``r2sweep.control``, ``r2sweep.control_of`` =
  the winner): ``r2_off``, the winner's configuration with R2 switched off, and
  ``r2_on_baseline``, the tuned baseline's configuration with the winner's R2 added.

Within one replicate search, the gains are differences of means over seeds, each with the
standard error of that difference (``sqrt(sd_a^2/n_a + sd_b^2/n_b)``). Over the study's
replicates, each arm (the baseline, a kind) gets the mean of its replicates' figures with an
uncertainty that also counts how far the searches landed apart
(:mod:`r2sweep.analysis.study_spread`); a gain is *clear* when it exceeds twice that, in
the direction the objective improves, and never from one search.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from r2sweep.analysis.study_spread import AcrossSearches
from r2sweep.core.errors import R2SweepError

__all__ = ["OverSeeds", "Gain", "StudyRow", "ArmRow", "StudyTable", "CONTROL_R2_OFF", "CONTROL_ON_BASELINE",
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
    n: int = 0  # the fewer seeds of the two sides

    @classmethod
    def of(cls, after: OverSeeds, before: OverSeeds, sign: int) -> Gain | None:
        if not after.values or not before.values:
            return None
        se = math.sqrt(after.sd**2 / after.n + before.sd**2 / before.n)
        delta = after.mean - before.mean
        n = min(after.n, before.n)
        return cls(delta, se, clear=n > 1 and sign * delta > 2 * se, n=n)

    def text(self) -> str:
        """Without a word on clearness: one search's gain is judged only over the searches (:class:`ArmRow`)."""
        return f"{self.delta:+.1f} +- {self.se:.1f}"


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
    replicate: int = 1

    @property
    def label(self) -> str:
        return _label(self.kind)


def _label(kind: str) -> str:
    return "none (tuned baseline)" if kind == "none" else kind


@dataclass
class ArmRow:
    """One arm of the study (the tuned baseline, or an R2 kind) over its replicate searches."""

    kind: str
    rows: list[StudyRow]  # one per replicate, in order; a replicate without a winner included
    objective: AcrossSearches | None = None
    gain: AcrossSearches | None = None  # over the tuned baseline of the same replicate
    gain_over_r2_off: AcrossSearches | None = None
    gain_on_baseline: AcrossSearches | None = None
    fp_change: float | None = None  # mean over the replicates that have one
    picks: int = 0  # replicates whose best arm this was
    best: StudyRow | None = None  # its replicates' winner with the best mean: what would ship

    @property
    def label(self) -> str:
        return _label(self.kind)


def _over_seeds(rows: Sequence[StudyRow]) -> AcrossSearches | None:
    scored = [r.objective for r in rows if r.objective.values]
    return AcrossSearches.of([o.mean for o in scored], [o.sd / math.sqrt(o.n) for o in scored],
                             min((o.n for o in scored), default=0))


def _over_gains(gains: Sequence[Gain | None]) -> AcrossSearches | None:
    found = [g for g in gains if g is not None]
    return AcrossSearches.of([g.delta for g in found], [g.se for g in found], min((g.n for g in found), default=0))


@dataclass
class StudyTable:
    """The study's answer: per replicate search its rows (the baseline first), per arm their
    combination, and the recommendation. :meth:`build` does all the arithmetic."""

    name: str
    objective: str
    mode: str
    seeds: tuple[int, ...]
    replicates: list[list[StudyRow]]
    arms: list[ArmRow]
    recommended: StudyRow  # the configuration to ship: the recommended arm's best replicate winner
    recommended_arm: ArmRow

    @classmethod
    def build(cls, name: str, objective: str, mode: str, seeds: tuple[int, ...],
              replicates: list[list[StudyRow]]) -> StudyTable:
        """Gains per replicate, arms over replicates, the pick.

        Raises:
            R2SweepError: no re-run of any winner finished (nothing to recommend).
        """
        sign = 1 if mode == "max" else -1
        for rows in replicates:
            base = rows[0]
            for row in rows[1:]:
                row.gain = Gain.of(row.objective, base.objective, sign)
                row.fp_change = row.fp.mean - base.fp.mean if base.fp.values and row.fp.values else None
                if CONTROL_R2_OFF in row.controls:
                    row.gain_over_r2_off = Gain.of(row.objective, row.controls[CONTROL_R2_OFF].over_seeds(objective), sign)
                if CONTROL_ON_BASELINE in row.controls:
                    row.gain_on_baseline = Gain.of(row.controls[CONTROL_ON_BASELINE].over_seeds(objective),
                                                   base.objective, sign)
        arms = []
        for position, kind in enumerate(row.kind for row in replicates[0]):
            rows = [rows[position] for rows in replicates]
            changes = [r.fp_change for r in rows if r.fp_change is not None]
            scored = [r for r in rows if r.objective.values]
            arms.append(ArmRow(kind=kind, rows=rows, objective=_over_seeds(rows), gain=_over_gains([r.gain for r in rows]),
                               gain_over_r2_off=_over_gains([r.gain_over_r2_off for r in rows]),
                               gain_on_baseline=_over_gains([r.gain_on_baseline for r in rows]),
                               fp_change=statistics.fmean(changes) if changes else None,
                               best=max(scored, key=lambda r: sign * r.objective.mean, default=None)))
        for rows in replicates:  # each search's own pick; on a tie the baseline (listed first) keeps it
            scored = [(position, r) for position, r in enumerate(rows) if r.objective.values]
            if scored:
                arms[max(scored, key=lambda pair: sign * pair[1].objective.mean)[0]].picks += 1
        ranked = [arm for arm in arms if arm.objective is not None]
        if not ranked:
            raise R2SweepError(f"study {name!r}: every re-run of every winner diverged or failed; nothing to recommend")
        # The best mean over the searches wins; on a tie the baseline stays: R2 must earn its place.
        pick = max(ranked, key=lambda arm: sign * arm.objective.mean)
        assert pick.best is not None
        return cls(name, objective, mode, seeds, replicates, arms, pick.best, pick)

    @property
    def searches(self) -> int:
        return len(self.replicates)

    @property
    def rows(self) -> list[StudyRow]:
        """Every sweep's row, replicate by replicate."""
        return [row for rows in self.replicates for row in rows]

    @property
    def baseline(self) -> StudyRow:
        """The tuned baseline the recommended configuration is set against: its own replicate's."""
        return self.replicates[self.recommended.replicate - 1][0]

    def _over(self) -> str:
        if self.searches == 1:
            return f"seeds {list(self.seeds)}"
        return f"{self.searches} searches x seeds {list(self.seeds)}"

    def verdict(self) -> str:
        """One sentence: what to ship, what it buys, and how sure that is."""
        arm, base = self.recommended_arm, self.arms[0]
        sign = 1 if self.mode == "max" else -1
        if arm.kind == "none":
            kinds = [a for a in self.arms[1:] if a.gain is not None]
            closest = max(kinds, key=lambda a: sign * a.gain.mean, default=None)
            also = f"; the closest kind, {closest.kind}: {closest.gain.text(signed=True)}" if closest is not None else ""
            unsure = f" ({_ONE_SEARCH})" if self.searches == 1 else ""
            return (f"ship the tuned baseline without R2: no R2 kind beat its {self.objective} "
                    f"{base.objective.text()} over {self._over()}{also}{unsure}")
        assert arm.gain is not None and arm.objective is not None
        if arm.gain.clear(sign):
            sure = "clear: more than twice its uncertainty, the searches' spread included"
        elif not arm.gain.searched:
            sure = _ONE_SEARCH
        else:
            sure = "inside its uncertainty: not clear"
        picked = f"; the pick of {arm.picks} of {self.searches} searches" if self.searches > 1 else ""
        fp = f"; FP {arm.fp_change:+.1f}" if arm.fp_change is not None else ""
        return (f"ship R2 {arm.kind}: {self.objective} {arm.objective.text()} over {self._over()}, "
                f"{arm.gain.text(signed=True)} over the tuned baseline ({sure}){picked}{fp}")

    def warnings(self) -> list[str]:
        """What makes the answer weaker than its numbers say: a winner whose pre-training fails
        on some seeds (its FP spans more than :data:`FRAGILE_FP_SPAN` points over them)."""
        found = []
        for row in self.rows:
            if row.missing or row.fp.n < 2 or max(row.fp.values) - min(row.fp.values) <= FRAGILE_FP_SPAN:
                continue
            against = ("every gain here is measured against it" if row.kind == "none"
                       else "its gains rest on the seeds where it trained")
            where = f" (search {row.replicate})" if self.searches > 1 else ""
            found.append(f"{row.label}{where}: its winner {row.trial_id} is fragile: FP {min(row.fp.values):.1f} to "
                         f"{max(row.fp.values):.1f} over the seeds (its pre-training fails on some), and {against}; "
                         "re-run more of each sweep's best (confirm.top) so a steadier configuration can win")
        return found

    def markdown(self) -> str:
        """The arms' table, then one row per sweep (the study page and the command line show the same)."""
        return f"{self.arms_markdown()}\n\n{self.sweeps_markdown()}"

    def arms_markdown(self) -> str:
        over = "mean over searches +- se" if self.searches > 1 else "mean +- se over seeds"
        lines = [f"| R2 | {self.objective} ({over}) | gain over the tuned baseline | its uncertainty | gain over R2 off "
                 "at the winner's knobs | R2 on the baseline's knobs: gain | FP change | picked by | winners |",
                 "|---|---|---|---|---|---|---|---|---|"]
        sign = 1 if self.mode == "max" else -1
        for arm in self.arms:
            if arm.objective is None:
                lines.append(f"| {arm.label} | {'; '.join(sorted({r.missing for r in arm.rows}))} |" + " - |" * 7)
                continue
            gain = "-" if arm.gain is None else arm.gain.text(signed=True) + (" (clear)" if arm.gain.clear(sign) else "")
            cells = [arm.label + (" **recommended**" if arm is self.recommended_arm else ""),
                     f"{arm.objective.text()} ({_count(arm.objective.searches, 'search')} x "
                     f"{_count(arm.objective.seeds_each, 'seed')})",
                     gain,
                     arm.gain.detail() if arm.gain else "-",
                     arm.gain_over_r2_off.text(signed=True) if arm.gain_over_r2_off else "-",
                     arm.gain_on_baseline.text(signed=True) if arm.gain_on_baseline else "-",
                     f"{arm.fp_change:+.1f}" if arm.fp_change is not None else "-",
                     f"{arm.picks} of {self.searches}",
                     ", ".join(r.trial_id for r in arm.rows if not r.missing)]
            lines.append("| " + " | ".join(cells) + " |")
        if self.searches == 1:
            lines += ["", "One search per arm (replicates: 1): each +- is the spread over the confirmation seeds only. "
                      "How far a second search of the same space would land is not measured; two searches of one "
                      "space have landed points apart, so no gain is called clear (replicates: 2 or more)."]
        return "\n".join(lines)

    def sweeps_markdown(self) -> str:
        lines = ["| search | R2 | sweep | objective (mean +- sd) | gain | over R2 off | R2 on the baseline's knobs "
                 "| fp/top1 | FP change | winner (searched values) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for row in self.rows:
            if row.missing:
                lines.append(f"| {row.replicate} | {row.label} | {row.sweep} | {row.missing} |" + " - |" * 6)
                continue
            cells = [str(row.replicate), row.label + (" **recommended**" if row is self.recommended else ""), row.sweep,
                     f"{row.objective.text()} (n={row.objective.n})",
                     row.gain.text() if row.gain else "-",
                     row.gain_over_r2_off.text() if row.gain_over_r2_off else "-",
                     row.gain_on_baseline.text() if row.gain_on_baseline else "-",
                     row.fp.text(),
                     f"{row.fp_change:+.1f}" if row.fp_change is not None else "-",
                     f"{row.trial_id}: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(row.params.items()))]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


_ONE_SEARCH = ("over seeds only: one search, whose spread is not measured; another search of the same space may land "
               "elsewhere (replicates: 2 or more measures it)")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}es" if what.endswith("h") else f"{n} {what}s"


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value

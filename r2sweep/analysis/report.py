"""``r2sweep report``: one sweep as a self-contained HTML page and its PNG figures.

Everything is read from MLflow (the source of truth), so a report works for a
sweep run on a cluster and opened on a laptop, and for a sweep still running
(it shows what has finished so far). The page answers, in order: what won and
what R2 bought over no R2 (per kind, the ``compare`` table); how the search
converged (objective per trial, best so far) and which parameters mattered
(Optuna's fANOVA importances, computed here from the finished trials); what
each R2 kind's best model does at every bit width of every downstream method;
what R2 did to the weights (the paper's picture: histograms of the worst-outlier
layers, best R2 trial against best no-R2 trial); and for multi-objective
sweeps, the Pareto front. The figures are also logged to the sweep's parent run
under ``report/``.

Nothing is half-written: figures go to a scratch folder first and are moved
into ``--out`` together, the page last.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from r2sweep import __version__
from r2sweep.analysis.compare import r2_kind, summarize_runs
from r2sweep.analysis.figures import (
    BitsSeries,
    TrialPoint,
    accuracy_vs_bits,
    accuracy_vs_bytes,
    kind_color,
    optimization_history,
    parameter_importances,
    pareto_front_plot,
)
from r2sweep.analysis.report_html import ReportPage, render_page
from r2sweep.analysis.select import read_sweep
from r2sweep.analysis.trials import layer_weights, logged_value
from r2sweep.core.config.search import SearchParam
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import R2SweepError
from r2sweep.core.outcome import finished_runs, run_outcome
from r2sweep.core.ranking import best_of, pareto_front
from r2sweep.core.plots import compare_weight_histograms, weight_histograms
from r2sweep.tracking.store import TAG_TRIAL_ID, SweepRun, Tracker, sanitize_key

__all__ = ["Report", "build_report", "history_points", "prepare_out", "REPORT_ARTIFACT_DIR", "PAGE"]

REPORT_ARTIFACT_DIR = "report"
PAGE = "index.html"
HISTORY_PNG = "optimization_history.png"
IMPORTANCE_PNG = "parameter_importances.png"
BITS_PNG = "accuracy_vs_bits.png"
BYTES_PNG = "accuracy_vs_bytes.png"
WEIGHTS_PNG = "weight_histograms.png"
PARETO_PNG = "pareto_front.png"
# fANOVA fits a forest on (params -> objective): with fewer trials it says nothing.
_MIN_TRIALS_FOR_IMPORTANCE = 4


@dataclass
class Report:
    page: Path
    figures: list[Path]
    notes: list[str] = field(default_factory=list)  # what the page could not show, and why
    advice: list[str] = field(default_factory=list)  # what the results suggest changing in the search space
    logged_to_run: str | None = None  # the parent run id, when logged


def _label(run: Any, spec: SweepSpec) -> str:
    kind = r2_kind(run, spec)
    return f"{'no R2' if kind == 'none' else 'R2 ' + kind} (trial {run.data.tags.get(TAG_TRIAL_ID, run.info.run_id[:8])})"


# -- advice ------------------------------------------------------------------------

EDGE = 0.05  # share of a range (log-scaled for loguniform) that counts as its edge


def _position(param: SearchParam, value: float) -> float:
    """Where ``value`` lies in ``param``'s range: 0 at the low end, 1 at the high end."""
    low, high = (float(v) for v in param.values)
    if param.kind == "loguniform":
        return math.log(value / low) / math.log(high / low)
    return (value - low) / (high - low)


def range_edge_advice(best_runs: Sequence[tuple[str, Any]], spec: SweepSpec) -> list[str]:
    """One line per numeric parameter whose value in a best trial sits at the edge of its range.

    A best trial on the edge says the optimum may lie outside the searched range
    (measured: on the science benchmark the best trials with and without R2 both
    sat at the top of the learning-rate range). ``best_runs`` pairs a label with
    a run (the best trial, the best without R2).
    """
    advice: list[str] = []
    for param in spec.params:
        if param.kind == "choice":
            continue
        low, high = param.values
        for label, run in best_runs:
            text = run.data.params.get(sanitize_key(param.path))
            value = logged_value(param, text) if text is not None else None
            if value is None or high == low:
                continue
            position = _position(param, float(value))
            if EDGE < position < 1 - EDGE:
                continue
            side, bound = ("upper", high) if position >= 1 - EDGE else ("lower", low)
            advice.append(f"{param.path} = {value:.4g} in {label} sits at the {side} edge of its range "
                          f"[{low:g}, {high:g}]: the optimum may lie beyond {bound:g}; widen the range and sweep again.")
    return advice


# -- parameter importances ---------------------------------------------------------


def _distribution(param: SearchParam) -> optuna.distributions.BaseDistribution:
    if param.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(param.values))
    if param.kind == "int":
        return optuna.distributions.IntDistribution(int(param.values[0]), int(param.values[1]))
    low, high = param.values
    return optuna.distributions.FloatDistribution(float(low), float(high), log=param.kind == "loguniform")


def _study(runs: Sequence[Any], spec: SweepSpec) -> optuna.Study:
    """An in-memory Optuna study holding ``runs`` as completed trials (first objective)."""
    study = optuna.create_study(direction="maximize" if spec.objective.mode == "max" else "minimize")
    for run in runs:
        params, distributions = {}, {}
        for param in spec.params:
            text = run.data.params.get(sanitize_key(param.path))
            value = logged_value(param, text) if text is not None else None
            if value is not None:
                params[param.path], distributions[param.path] = value, _distribution(param)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, value=run.data.metrics[spec.objective.metric]))
    return study


def importance_groups(finished: Sequence[Any], spec: SweepSpec) -> tuple[list[tuple[str, dict[str, float]]], list[str]]:
    """fANOVA importances over all finished trials (parameters every trial has), and,
    when some parameters exist only with R2 on (strength, margin), over those trials
    too: otherwise conditional parameters would never be ranked."""
    groups: list[tuple[str, dict[str, float]]] = []
    notes: list[str] = []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    candidates = [(f"all {len(finished)} finished trials", list(finished))]
    conditional = [p.path for p in spec.params if any(name == "r2.kind" for name, _ in p.when)]
    if conditional:
        with_r2 = [r for r in finished if r2_kind(r, spec) != "none"]
        candidates.append((f"the {len(with_r2)} finished trials with R2 on", with_r2))
    for title, runs in candidates:
        if len(runs) < _MIN_TRIALS_FOR_IMPORTANCE:
            which = f" of {', '.join(conditional)}" if runs is not finished else ""
            notes.append(f"Parameter importances{which} over {title.removeprefix('the ')}: fANOVA needs at least "
                         f"{_MIN_TRIALS_FOR_IMPORTANCE} finished trials.")
            continue
        study = _study(runs, spec)
        # Parameters every trial of the group has and that vary in it: a constant
        # one (r2.kind among R2 trials) would only add a bar at zero.
        trials = study.trials
        varying = [p.path for p in spec.params
                   if all(p.path in t.params for t in trials) and len({repr(t.params[p.path]) for t in trials}) > 1]
        if not varying:
            notes.append(f"Parameter importances over {title.removeprefix('the ')}: no parameter varies across them.")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                importances = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=varying)
            except (RuntimeError, ValueError) as error:
                notes.append(f"Parameter importances over {title.removeprefix('the ')}: {error}")
                continue
        if importances:
            hint = " (few trials: a rough hint)" if len(runs) < 2 * _MIN_TRIALS_FOR_IMPORTANCE else ""
            groups.append((title + hint, dict(importances)))
    return groups, notes


# -- the figures ---------------------------------------------------------------


def history_points(runs: Sequence[Any], spec: SweepSpec) -> list[TrialPoint]:
    metric = spec.objective.metric
    return [TrialPoint(number=i, kind=r2_kind(r, spec), outcome=run_outcome(r, spec.objective_metrics), objective=r.data.metrics.get(metric),
                       proxy=r.data.metrics.get("proxy/top1")) for i, r in enumerate(runs, start=1)]


def _bits_panels(best_by_kind: dict[str, Any], spec: SweepSpec) -> list[tuple[str, list[BitsSeries]]]:
    panels = []
    for entry in spec.trial.downstream:
        method = entry.result_name("*")
        series = []
        for kind, run in best_by_kind.items():
            accuracy = {b: run.data.metrics[f"{entry.result_name(b)}/top1"] for b in entry.weight_bits
                        if f"{entry.result_name(b)}/top1" in run.data.metrics}
            if accuracy:
                series.append(BitsSeries(_label(run, spec), kind, accuracy, run.data.metrics.get("fp/top1")))
        if series:
            panels.append((method, series))
    return panels


def _bytes_series(best_by_kind: dict[str, Any], spec: SweepSpec) -> list[tuple[str, str, list, tuple | None]]:
    """Per R2 kind's best trial, every result's (bytes, top-1, name) and its FP point (trials from before sizes: none)."""
    series = []
    for kind, run in best_by_kind.items():
        metrics = run.data.metrics
        points = [(metrics[f"{name}/size_bytes"], metrics[f"{name}/top1"], name) for name in spec.trial.result_names()
                  if f"{name}/size_bytes" in metrics and f"{name}/top1" in metrics]
        fp = (metrics["fp/size_bytes"], metrics["fp/top1"]) if "fp/size_bytes" in metrics and "fp/top1" in metrics else None
        if points:
            series.append((_label(run, spec), kind, points, fp))
    return series


def _weight_figure(sweep: SweepRun, best_no_r2: Any, best_r2: Any, spec: SweepSpec, path: Path) -> tuple[Path | None, list[str]]:
    chosen = [r for r in (best_no_r2, best_r2) if r is not None]
    models, notes = {}, []
    for run in chosen:
        weights, note = layer_weights(sweep.client, run.info.run_id, _label(run, spec))
        if weights is None:
            notes.append(note)
        else:
            models[_label(run, spec)] = weights
    if not models:
        return None, notes
    if len(models) == 1:
        (label, model), = models.items()
        which = "without" if best_no_r2 is None else "with"
        notes.append(f"Weight histograms show one model only: no finished trial {which} R2 to compare against.")
        return weight_histograms(model, path, title=f"{label}: the 4 layers with the largest max|w|/std"), notes
    reference = next(iter(models))  # the no-R2 model: its worst layers are what R2 should fix
    colors = {_label(run, spec): kind_color(r2_kind(run, spec)) for run in chosen}
    title = "Best trial without R2 vs best trial with R2: the 4 layers with the most outlying weights without R2"
    return compare_weight_histograms(models, path, reference=reference, layers=4, title=title, colors=colors), notes


def _pareto_figure(finished: Sequence[Any], spec: SweepSpec, path: Path) -> Path:
    y_metric, x_metric = spec.objectives[0].metric, spec.objectives[1].metric
    front = pareto_front(list(finished), spec)
    chosen = best_of(front, spec)
    return pareto_front_plot(
        [(r.data.metrics[x_metric], r.data.metrics[y_metric], r2_kind(r, spec)) for r in finished],
        [(r.data.metrics[x_metric], r.data.metrics[y_metric]) for r in front],
        x_metric, y_metric, path,
        chosen=(chosen.data.metrics[x_metric], chosen.data.metrics[y_metric]),
    )


# -- the report ----------------------------------------------------------------


def prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise R2SweepError(f"--out {out} is a file; give a folder for the report (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise R2SweepError(f"--out {out}: cannot create the folder ({error.strerror})") from None


def build_report(tracker: Tracker, name: str, out: str | os.PathLike[str], *, log_to_run: bool = True) -> Report:
    """Write ``out/index.html`` and its PNGs for sweep ``name``; log them to the parent run.

    Raises:
        R2SweepError: no such sweep, no trial yet, no finished trial yet, or an
            unusable ``out``.
    """
    sweep, spec = read_sweep(tracker, name)
    runs = sweep.trial_runs()
    if not runs:
        raise R2SweepError(f"sweep {name!r} has no trials yet")
    metrics = [o.metric for o in spec.objectives]
    finished = finished_runs(runs, spec.objective_metrics)
    if not finished:
        raise R2SweepError(f"sweep {name!r} has no finished trial with {metrics[0]} yet ({len(runs)} started)")
    out = Path(out)
    prepare_out(out)

    best_by_kind: dict[str, Any] = {}
    for kind in sorted({r2_kind(r, spec) for r in finished}, key=lambda k: (k != "none", k)):
        best_by_kind[kind] = best_of([r for r in finished if r2_kind(r, spec) == kind], spec)
    best_no_r2 = best_by_kind.get("none")
    best_r2 = best_of([r for k, r in best_by_kind.items() if k != "none"], spec)

    notes: list[str] = []
    best = best_of(finished, spec)
    advice = range_edge_advice(
        [("the best trial", best)] + ([("the best trial without R2", best_no_r2)]
                                      if best_no_r2 is not None and best_no_r2 is not best else []), spec)
    scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        figures: dict[str, Path] = {}
        figures["history"] = optimization_history(history_points(runs, spec), spec.objective.metric,
                                                  spec.objective.mode, scratch / HISTORY_PNG)
        groups, importance_notes = importance_groups(finished, spec)
        notes += importance_notes
        if groups:
            figures["importances"] = parameter_importances(groups, scratch / IMPORTANCE_PNG)
        panels = _bits_panels(best_by_kind, spec)
        if panels:
            figures["bits"] = accuracy_vs_bits(panels, scratch / BITS_PNG)
        sizes = _bytes_series(best_by_kind, spec)
        if sizes:
            figures["bytes"] = accuracy_vs_bytes(sizes, scratch / BYTES_PNG)
        weights, weight_notes = _weight_figure(sweep, best_no_r2, best_r2, spec, scratch / WEIGHTS_PNG)
        notes += weight_notes
        if weights is not None:
            figures["weights"] = weights
        if spec.multi_objective:
            figures["pareto"] = _pareto_figure(finished, spec, scratch / PARETO_PNG)

        parent = tracker.client.get_run(sweep.parent_run_id).info
        page = ReportPage(
            name=name,
            source=tracker.display_uri,
            generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            version=__version__,
            sweep_status=parent.status,
            spec=spec,
            runs=runs,
            summary=summarize_runs(sweep, spec, runs, by="r2.kind") + summarize_runs(sweep, spec, runs),
            best=best,
            best_no_r2=best_no_r2,
            figures={key: path.name for key, path in figures.items()},
            notes=notes,
            advice=advice,
        )
        render_page(page, scratch, scratch / PAGE)
        written = [out / path.name for path in figures.values()]
        for path in figures.values():
            os.replace(path, out / path.name)
        os.replace(scratch / PAGE, out / PAGE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report = Report(page=out / PAGE, figures=written, notes=notes, advice=advice)
    if log_to_run:
        for path in [*written, report.page]:
            sweep.log_artifact(sweep.parent_run_id, path, REPORT_ARTIFACT_DIR)
        report.logged_to_run = sweep.parent_run_id
    return report

"""A study's page: the answer, its table and the figures, as one self-contained HTML file.

Drawn from the :class:`~r2sweep.analysis.study_table.StudyTable` (itself read from
MLflow) and the winners' pre-trained weights in MLflow: accuracy against bit width
with and without R2 (means over the confirmation seeds, the recommended kind's
controls beside them), the weights of the baseline's winner against the best R2
kind's, and each sweep's optimization history.
"""

from __future__ import annotations

import base64
import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from r2sweep import __version__
from r2sweep.analysis.figures import BitsSeries, accuracy_vs_bits, kind_color, optimization_history
from r2sweep.analysis.report import history_points, prepare_out
from r2sweep.analysis.report_html import PAGE_CSS
from r2sweep.analysis.select import read_sweep
from r2sweep.analysis.study_table import CONTROL_ON_BASELINE, CONTROL_R2_OFF, Reruns, StudyRow, StudyTable
from r2sweep.analysis.trials import layer_weights
from r2sweep.core.config.study import StudySpec
from r2sweep.core.plots import compare_weight_histograms
from r2sweep.tracking.store import Tracker

__all__ = ["StudyPage", "write_study_page", "STUDY_PAGE", "TABLE_FILE"]

STUDY_PAGE = "index.html"
TABLE_FILE = "table.md"
BITS_PNG = "accuracy_vs_bits.png"
WEIGHTS_PNG = "weight_histograms.png"


@dataclass
class StudyPage:
    """What :func:`write_study_page` wrote: the page, the Markdown table, the figures, and what it could not draw."""

    page: Path
    table: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _series(label: str, kind: str, reruns: Reruns, entry, fp: float | None) -> BitsSeries | None:
    accuracy, spread = {}, {}
    for bits in entry.weight_bits:
        values = reruns.over_seeds(f"{entry.result_name(bits)}/top1")
        if values.values:
            accuracy[bits], spread[bits] = values.mean, values.sd
    return BitsSeries(label, kind, accuracy, fp, spread) if accuracy else None


def _shown_search(table: StudyTable) -> list[StudyRow]:
    """The rows the figures draw: one search's, the search the recommended configuration comes from."""
    return table.replicates[table.recommended.replicate - 1]


def _compared_kind(table: StudyTable) -> StudyRow | None:
    """The R2 row the figures set against the baseline: the recommended one, else that search's best-scoring kind."""
    if table.recommended.kind != "none":
        return table.recommended
    sign = 1 if table.mode == "max" else -1
    kinds = [r for r in _shown_search(table)[1:] if r.objective.values]
    return max(kinds, key=lambda r: sign * r.objective.mean, default=None)


def _bits_figure(table: StudyTable, study: StudySpec, path: Path) -> Path | None:
    panels = []
    chosen = _compared_kind(table)
    for entry in study.baseline.spec.trial.downstream:
        series = []
        for row in (r for r in _shown_search(table) if not r.missing):
            n = row.objective.n
            line = _series(f"{row.label}, winner ({n} seeds)", row.kind, row.reruns, entry, row.fp.mean)
            series.append(line)
        if chosen is not None:
            for control, label, kind in ((CONTROL_R2_OFF, f"R2 off at {chosen.kind}'s knobs", "none"),
                                         (CONTROL_ON_BASELINE, f"{chosen.kind} on the baseline's knobs", chosen.kind)):
                if control in chosen.controls:
                    series.append(_series(label, kind, chosen.controls[control], entry, None))
        series = [s for s in series if s is not None]
        if series:
            panels.append((entry.result_name("*"), series))
    return accuracy_vs_bits(panels, path) if panels else None


def _weights_figure(tracker: Tracker, table: StudyTable, path: Path, notes: list[str]) -> Path | None:
    compared = _compared_kind(table)
    rows = [table.baseline, *([compared] if compared is not None else [])]
    models, colors = {}, {}
    for row in rows:
        weights, note = layer_weights(tracker.client, row.run_id, f"the winner of {row.sweep}")
        if weights is None:
            notes.append(note)
            continue
        label = f"{row.label} ({row.trial_id}, sweep seed)"
        models[label], colors[label] = weights, kind_color(row.kind)
    if not models:
        return None
    title = "The tuned baseline's winner against the R2 winner: the layers with the most outlying weights without R2"
    return compare_weight_histograms(models, path, layers=4, title=title, colors=colors)


def _history_figures(tracker: Tracker, study: StudySpec, folder: Path) -> list[Path]:
    written = []
    for sweep in study.sweeps:
        if tracker.find_sweep(sweep.name) is None:
            continue  # not run yet
        run, spec = read_sweep(tracker, sweep.name)
        written.append(optimization_history(history_points(run.trial_runs(), spec), spec.objective.metric,
                                            spec.objective.mode, folder / f"history_{sweep.name}.png"))
    return written


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)} (<code>{escape(path.name)}</code>)</figcaption></figure>")


def _table_html(markdown: str) -> str:
    """One of the table's Markdown tables as HTML (lines after it as a note); the recommended row marked."""
    lines = markdown.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    body, after = [], []
    for line in lines[2:]:
        if not line.startswith("|"):
            after.append(line)
            continue
        best = "**recommended**" in line
        cells = "".join(f"<td>{escape(c.strip().replace(' **recommended**', ''))}</td>" for c in line.strip("|").split("|"))
        body.append(f"<tr{' class=best' if best else ''}>{cells}</tr>")
    note = "".join(f'<p class="warning">{escape(line)}</p>' for line in after if line.strip())
    return f"<table><tr>{''.join(f'<th>{escape(h)}</th>' for h in head)}</tr>{''.join(body)}</table>{note}"


def write_study_page(tracker: Tracker, study: StudySpec, table: StudyTable, out: str | os.PathLike[str],
                     *, study_text: str = "") -> StudyPage:
    """Write ``out/index.html``, ``out/table.md`` and the PNGs; files are replaced only once all are drawn."""
    out = Path(out)
    prepare_out(out)
    scratch = Path(tempfile.mkdtemp(prefix=".study-", dir=out))
    notes: list[str] = []
    try:
        sections = []
        bits = _bits_figure(table, study, scratch / BITS_PNG)
        if bits is not None:
            sections.append(("Accuracy against bit width", _img(bits, "Each sweep's confirmed winner, mean +- sd over "
                             "the confirmation seeds, at every weight bit width; dotted: its FP top-1. The R2 kind "
                             "shown against the baseline also has its two controls drawn.")))
        weights = _weights_figure(tracker, table, scratch / WEIGHTS_PNG, notes)
        if weights is not None:
            sections.append(("Weight histograms", _img(weights, "Pre-trained weights (the sweep's own seed) of the "
                             "baseline's winner and of the R2 winner, in the layers where the baseline's farthest "
                             "weight lies most standard deviations out.")))
        histories = _history_figures(tracker, study, scratch)
        sections.append(("The sweeps", "".join(_img(p, f"Sweep {p.stem.removeprefix('history_')}: every trial's "
                                                     "objective in start order, and the best so far.")
                                               for p in histories)))
        figures = [p for p in (bits, weights, *histories) if p is not None]
        warnings = table.warnings()
        warning_lines = "".join(f"\nwarning: {w}\n" for w in warnings)
        (scratch / TABLE_FILE).write_text(f"{table.verdict()}\n{warning_lines}\n{table.markdown()}\n", encoding="utf-8")
        generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        notes_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
        html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>r2sweep study: {escape(table.name)}</title><style>{PAGE_CSS}</style></head><body>
<h1>Study <code>{escape(table.name)}</code>: what does R2 buy?</h1>
<p class="meta">{len(table.rows)} sweeps ({', '.join(escape(r.sweep) for r in table.rows)}), winners re-run on seeds
{escape(str(list(table.seeds)))}; read from {escape(tracker.display_uri)} on {escape(generated)} by r2sweep {escape(__version__)}.</p>
<p class="cards"><span class="card"><span class="value">{escape(table.recommended.label)}</span><br>
<span class="what">recommended</span></span></p>
<p><b>{escape(table.verdict())}.</b></p>
{''.join(f'<p class="warning">Warning: {escape(w)}.</p>' for w in warnings)}
<h2 id="table">Per arm{f", over {table.searches} searches" if table.searches > 1 else ""}</h2>
{_table_html(table.arms_markdown())}
<h2 id="sweeps">Per sweep</h2>
{_table_html(table.sweeps_markdown())}
<p class="meta">Per sweep, gains are differences of means over the seeds +- the standard error of the difference.
Per arm, each figure is the mean over the searches (replicates) +- a standard error that counts the spread between
searches and between seeds; "clear" means beyond twice that, and needs two searches or more. "Gain over R2 off" re-runs the kind's winner with the R2 term removed (same knobs, same seeds);
"R2 on the baseline's knobs" adds the winner's R2 to the tuned baseline's configuration.</p>
{''.join(f'<h2>{escape(title)}</h2>{body}' for title, body in sections)}
{f'<h2 id="notes">Not shown</h2><ul class="notes">{notes_html}</ul>' if notes else ''}
<h2 id="file">The study file</h2><pre>{escape(study_text)}</pre>
</body></html>
"""
        (scratch / STUDY_PAGE).write_text(html, encoding="utf-8")
        written = []
        for path in [*figures, scratch / TABLE_FILE, scratch / STUDY_PAGE]:
            os.replace(path, out / path.name)
            written.append(out / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return StudyPage(page=out / STUDY_PAGE, table=out / TABLE_FILE, figures=written[:-2], notes=notes)

"""The HTML page of ``r2sweep report``: one file, figures inlined, no network needed.

The PNGs are embedded as data URIs so the page can be mailed, attached to a
ticket or opened from an artifact store on its own; the same PNGs sit beside it
for slides. Every value is escaped: params and tags come from MLflow, where any
user could have written anything.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from r2sweep.analysis.compare import ComparisonRow
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.outcome import finished_runs, run_outcome
from r2sweep.core.ranking import ranked as ranked_trials
from r2sweep.tracking.store import TAG_TRIAL_ID, sanitize_key

__all__ = ["ReportPage", "render_page", "PAGE_CSS"]

PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 24px 32px 64px; color: #1d2330; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d8dce4; }
.meta { color: #5a6273; font-size: 0.9em; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid #d8dce4; border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .value { font-size: 1.5em; font-weight: 600; } .card .what { color: #5a6273; font-size: 0.85em; }
.good { color: #1a7f37; } .bad { color: #c62828; }
table { border-collapse: collapse; font-size: 0.86em; margin: 8px 0; }
th, td { border-bottom: 1px solid #e4e7ed; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef7ee; }
figure { margin: 18px 0; } figure img { max-width: 100%; border: 1px solid #e4e7ed; }
figcaption { color: #3d4556; font-size: 0.9em; max-width: 900px; }
.notes li, .warning { color: #6b4e00; } code { background: #f3f5f8; padding: 0 3px; }
"""

_CAPTIONS = {
    "history": ("Optimization history",
                "The objective of every finished trial in start order, coloured by R2 kind; the black line is "
                "the best so far. Hollow markers are trials the scheduler stopped early, drawn at the last "
                "low-bit proxy accuracy they reported (a cheaper stand-in for the objective)."),
    "importances": ("Parameter importances",
                    "Optuna's fANOVA evaluator fitted on the finished trials' parameters and objective: the "
                    "share of the objective's variance each parameter explains. Across all trials Optuna ranks "
                    "only the parameters every trial has; those searched only with R2 on (strength, margin) are "
                    "ranked in a second panel over the trials with R2."),
    "bits": ("Accuracy against bit width",
             "For each downstream method, the best trial of each R2 kind (chosen by the objective) at every "
             "weight bit width it was evaluated at. Dashed grey: no R2. Dotted: that model's FP accuracy."),
    "bytes": ("Accuracy against size",
              "The same trials, each result at its size in bytes: the weights bit-packed at their width, the "
              "scales, zero points or lookup tables that decode them, and everything else in float32 "
              "(r2sweep.core.quant.size). Hollow: that model in FP32. Trials logged before sizes existed are left out."),
    "weights": ("Weight histograms",
                "Pre-trained weights of the best R2 trial against the best trial without R2, in the four layers "
                "where the no-R2 model's farthest weight lies most standard deviations out. Counts are log "
                "scale so the few outliers that stretch a low-bit grid stay visible."),
    "pareto": ("Pareto front",
               "Every finished trial on the first two objectives; the line joins the trials no other trial "
               "beats on both. The ringed trial is the one selected as best."),
}


@dataclass
class ReportPage:
    name: str
    source: str  # the tracking URI, credentials redacted
    generated: str
    version: str
    sweep_status: str
    spec: SweepSpec
    runs: Sequence[Any]  # every trial run, in start order
    summary: Sequence[ComparisonRow]  # per R2 kind, then the whole sweep
    best: Any
    best_no_r2: Any | None
    figures: dict[str, str]  # figure key -> PNG file name
    notes: Sequence[str]
    advice: Sequence[str] = ()


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _value(text: str) -> str:
    """A logged param value for reading: floats to 4 significant digits (MLflow keeps all 17)."""
    try:
        number = float(text)
    except ValueError:
        return text
    return text if number.is_integer() and "." not in text and "e" not in text.lower() else f"{number:.4g}"


def _config(params: dict[str, str]) -> str:
    return ", ".join(f"{key}={_value(value)}" for key, value in sorted(params.items()))


def _card(value: str, what: str, css: str = "") -> str:
    return f'<div class="card"><div class="value {css}">{escape(value)}</div><div class="what">{escape(what)}</div></div>'


def _cards(page: ReportPage) -> str:
    metric = page.spec.objective.metric
    best = page.best.data.metrics
    cards = [_card(_num(best[metric]), f"best {metric} (trial {page.best.data.tags.get(TAG_TRIAL_ID, '')})"),
             _card(_num(best.get("fp/top1")), "its FP top-1")]
    if page.best_no_r2 is not None:
        base = page.best_no_r2.data.metrics
        gain = best[metric] - base[metric]
        sign = 1 if page.spec.objective.mode == "max" else -1
        cards.append(_card(_num(gain, signed=True), f"over the best no-R2 trial ({_num(base[metric])})",
                           "good" if sign * gain > 0 else "bad" if sign * gain < 0 else ""))
        if "fp/top1" in best and "fp/top1" in base:
            cost = best["fp/top1"] - base["fp/top1"]
            cards.append(_card(_num(cost, signed=True), "FP top-1 against that no-R2 trial",
                               "bad" if cost < -0.5 else "good" if cost > 0 else ""))
    else:
        cards.append(_card("-", "no finished trial without R2 to compare against"))
    config = _config(page.best.data.params)
    return f'<div class="cards">{"".join(cards)}</div><p>Best configuration: <code>{escape(config)}</code></p>'


def _summary_table(rows: Sequence[ComparisonRow]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("R2 kind", "finished", "stopped", "failed", "best", "fp/top1",
                                            "gain vs best no-R2", "best trial", "its configuration"))
    body = []
    for row in rows:
        group = "whole sweep" if row.group == "all" else row.group
        config = _config(row.best_params)
        body.append(
            f"<tr><td>{escape(group)}</td><td class=num>{row.finished}</td><td class=num>{row.stopped}</td>"
            f"<td class=num>{row.failed}</td><td class=num>{_num(row.best)}</td><td class=num>{_num(row.fp_top1)}</td>"
            f"<td class=num>{_num(row.gain_over_no_r2, signed=True)}</td><td>{escape(row.best_trial)}</td>"
            f"<td><code>{escape(config)}</code></td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _result_columns(page: ReportPage) -> list[str]:
    names = [f"{entry.result_name(b)}/top1" for entry in page.spec.trial.downstream for b in entry.weight_bits]
    objective = page.spec.objective.metric
    return [objective, "fp/top1", *[n for n in names if n != objective], "proxy/top1"]


def _trials_table(page: ReportPage) -> str:
    searched = [sanitize_key(p.path) for p in page.spec.params]
    columns = _result_columns(page)
    head = "".join(f"<th>{escape(h)}</th>" for h in ("#", "trial", "outcome", *searched, *columns))
    numbered = list(enumerate(page.runs, start=1))
    finished = {run.info.run_id for run in finished_runs(page.runs, page.spec.objective_metrics)}
    done = [item for item in numbered if item[1].info.run_id in finished]
    by_run = {id(run): (number, run) for number, run in done}
    ordered = [by_run[id(run)] for run in ranked_trials([run for _, run in done], page.spec)]
    ordered += [item for item in numbered if item not in done]
    body = []
    for number, run in ordered:
        outcome = run_outcome(run, page.spec.objective_metrics)
        css = ' class="best"' if run.info.run_id == page.best.info.run_id else ""
        cells = [str(number), escape(run.data.tags.get(TAG_TRIAL_ID, "")), escape(outcome)]
        cells += [escape(_value(run.data.params.get(key, "-"))) for key in searched]
        row = "".join(f"<td>{c}</td>" for c in cells)
        row += "".join(f"<td class=num>{_num(run.data.metrics.get(c))}</td>" for c in columns)
        body.append(f"<tr{css}>{row}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(key: str, file_name: str, folder: Path) -> str:
    title, caption = _CAPTIONS[key]
    data = base64.b64encode((folder / file_name).read_bytes()).decode("ascii")
    return (f'<h2 id="{key}">{escape(title)}</h2><figure><img alt="{escape(title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(caption)} '
            f"(<code>{escape(file_name)}</code>)</figcaption></figure>")


def _search_space(spec: SweepSpec) -> str:
    items = []
    for param in spec.params:
        when = "; ".join(f"when {name} in {list(values)}" for name, values in param.when)
        items.append(f"<li><code>{escape(param.path)}</code>: {escape(param.kind)} {escape(str(list(param.values)))}"
                     f"{' ' + escape(when) if when else ''}</li>")
    settings = spec.settings
    return (f"<ul>{''.join(items)}</ul><p class=meta>{settings.num_samples} trials, sampler {escape(settings.sampler)}, "
            f"scheduler {escape(settings.scheduler)}, seed {settings.seed}, objective "
            + ", ".join(f"{escape(o.metric)} ({o.mode})" for o in spec.objectives) + "</p>")


def render_page(page: ReportPage, figure_folder: Path, path: Path) -> Path:
    """Write the page to ``path``, inlining the figures found in ``figure_folder``."""
    order = ["history", "importances", "bits", "bytes", "weights", "pareto"]
    figures = "".join(_figure(key, page.figures[key], figure_folder) for key in order if key in page.figures)
    notes = "".join(f"<li>{escape(n)}</li>" for n in page.notes)
    advice = "".join(f"<li>{escape(a)}</li>" for a in page.advice)
    finished = len(finished_runs(page.runs, page.spec.objective_metrics))
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>r2sweep report: {escape(page.name)}</title><style>{PAGE_CSS}</style></head><body>
<h1>Sweep <code>{escape(page.name)}</code></h1>
<p class="meta">{len(page.runs)} trials ({finished} finished), sweep {escape(page.sweep_status.lower())};
read from {escape(page.source)} on {escape(page.generated)} by r2sweep {escape(page.version)}.</p>
{_cards(page)}
{f'<h2 id="advice">Worth checking</h2><ul class="notes">{advice}</ul>' if advice else ''}
<h2 id="kinds">Per R2 kind</h2>
{_summary_table(page.summary)}
{figures}
{f'<h2 id="notes">Not shown</h2><ul class="notes">{notes}</ul>' if notes else ''}
<h2 id="trials">All trials</h2>
<p class="meta">Finished trials best first (the selected one highlighted), then stopped, failed and running ones.</p>
{_trials_table(page)}
<h2 id="space">Search space</h2>
{_search_space(page.spec)}
</body></html>
"""
    path.write_text(html, encoding="utf-8")
    return path

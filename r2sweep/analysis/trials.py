"""A sweep's trials as one table: a row per trial, its sampled values, outcome and results.

The shape users know from ``ResultGrid.get_dataframe()`` and
``study.trials_dataframe()``, read from MLflow (the source of truth, so it
works for a sweep run elsewhere or still running). Sampled values come back from
MLflow as text and are turned back into what the search sampled.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pandas as pd

from r2sweep.core.config.search import SearchParam
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.outcome import run_outcome
from r2sweep.core.pretrained_file import PRETRAINED, load_pretrained
from r2sweep.tracking.names import TAG_PRETRAIN_CACHE
from r2sweep.tracking.store import TAG_TRIAL_ID

__all__ = ["trials_frame", "logged_value", "layer_weights", "CONFIG_PREFIX"]

#: Columns of sampled values are ``config/<path>``, as in Ray Tune's dataframe.
CONFIG_PREFIX = "config/"


def logged_value(param: SearchParam, text: str) -> Any:
    """A logged (text) param value back as the value Optuna sampled; None if it is not one."""
    try:
        if param.kind == "choice":
            return next((v for v in param.values if str(v) == text), None)
        return int(text) if param.kind == "int" else float(text)
    except ValueError:
        return None


def layer_weights(client: Any, run_id: str, label: str) -> tuple[dict[str, Any] | None, str | None]:
    """The Conv/Linear weights of a trial's logged ``pretrained.pt``, by layer (tensors read with
    ``weights_only``: no model is built, no code it names runs); or None and why, for a figure's notes."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, PRETRAINED, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            return None, f"Weight histograms: {label} has no {PRETRAINED} artifact."
        try:
            return load_pretrained(local).layers, None
        except Exception as error:  # noqa: BLE001 - a damaged or foreign file is a note, not a failed report
            return None, f"Weight histograms: {label}'s {PRETRAINED} is not readable ({error})."


def trials_frame(runs: list[Any], spec: SweepSpec) -> pd.DataFrame:
    """One row per trial run: ``trial_id``, ``run_id``, ``outcome``, ``pretrain_cache`` (how its pre-trained
    weights came: stored, hit, off; '' before it ended), ``config/<path>`` per searched parameter (None
    where its condition left it unsampled), then every final metric the run holds."""
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        row: dict[str, Any] = {
            "trial_id": run.data.tags.get(TAG_TRIAL_ID, ""),
            "run_id": run.info.run_id,
            "outcome": run_outcome(run, spec.objective_metrics),
            "pretrain_cache": run.data.tags.get(TAG_PRETRAIN_CACHE, ""),
        }
        for param in spec.params:
            text = params.get(param.path)
            row[CONFIG_PREFIX + param.path] = None if text is None else logged_value(param, text)
        row.update(sorted(metrics.items()))
        rows.append(row)
    columns = ["trial_id", "run_id", "outcome", "pretrain_cache", *(CONFIG_PREFIX + p.path for p in spec.params)]
    frame = pd.DataFrame(rows)
    return frame if rows else pd.DataFrame(columns=columns)

"""Pick a sweep's best trial from MLflow, export its config and promote its model.

MLflow is the source of truth, so selection works for a sweep run on a cluster
and inspected elsewhere, and for a sweep still running. The rule:

* single objective: the finished trial with the best objective; ties broken by
  the higher ``fp/top1`` (the cheaper R2 setting in FP accuracy wins);
* several objectives: the Pareto front of the finished trials, and from it the
  trial best on the first objective (ties by the next objectives): the front is
  reported, the first objective is what the user listed first.

Diverged, failed and stopped trials never win: they have no objective value.
"""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from r2sweep.core.config.record import read_record
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import ConfigError, FileConfigError, R2SweepError
from r2sweep.core.outcome import finished_runs
from r2sweep.core.pretrained_file import MODEL_ARCHIVE, PRETRAINED, load_pretrained
from r2sweep.core.ranking import best_of, pareto_front
from r2sweep.tracking.errors import is_missing
from r2sweep.tracking.names import TAG_NOTES
from r2sweep.tracking.store import SPEC_ARTIFACT, TAG_TRIAL_ID, SweepRun, Tracker

__all__ = ["BestTrial", "read_sweep", "pick_best", "best_trial", "select_best", "register_champion", "TAG_BEST_RUN", "TAG_BEST_TRIAL"]

TAG_BEST_RUN = "r2sweep.best_run_id"
TAG_BEST_TRIAL = "r2sweep.best_trial_id"
TRIAL_CONFIG_ARTIFACT = "trial_config.yaml"


@dataclass
class BestTrial:
    """A sweep's best trial as MLflow holds it.

    ``config`` is its whole trial config (re-runnable: ``r2sweep.run_trial(best.config)``),
    ``params`` the values the search sampled, as MLflow keeps them (text);
    ``config_path`` and ``model_version`` are set once it was exported and registered.
    """

    run_id: str
    trial_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    config: dict[str, Any] | None  # None: the run holds no trial_config.yaml
    config_path: Path | None = None
    model_version: str | None = None
    front: list[str] = field(default_factory=list)  # run ids on the Pareto front (multi-objective), else [run_id]
    model_uri: str | None = None  # models:/r2sweep-<sweep>/<version>, once registered
    config_text: str = field(default="", repr=False)  # the artifact as stored: what best.yaml gets, byte for byte
    notes: list[str] = field(default_factory=list)  # what could not be done for it (a champion not registered)


def read_sweep(tracker: Tracker, name: str) -> tuple[SweepRun, SweepSpec]:
    """Sweep ``name``'s parent run and the spec it was started with (its record, read as data).

    Raises:
        R2SweepError: no sweep of that name in the tracking store; a record that does not read
            (a :class:`FileConfigError` naming the record and the field).
    """
    sweep = tracker.find_sweep(name)
    if sweep is None:
        # Name the sweeps that do exist: a typo is the usual cause.
        known = tracker.experiment_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (experiments there: {', '.join(known[:8]) or 'none'})"
        raise R2SweepError(f"no sweep named {name!r} in {tracker.display_uri}{hint}")
    with tempfile.TemporaryDirectory() as tmp:
        spec_text = Path(tracker.client.download_artifacts(sweep.parent_run_id, SPEC_ARTIFACT, tmp)).read_text()
    try:
        return sweep, read_record(spec_text, name=name)
    except ConfigError as error:  # a record this r2sweep cannot read (an older one's, or edited): one line
        raise FileConfigError(f"sweep {name!r}'s record ({SPEC_ARTIFACT} of its MLflow parent run)", error) from None


def pick_best(tracker: Tracker, name: str) -> BestTrial:
    """Sweep ``name``'s best trial by the rule above; reads MLflow, writes nothing.

    Raises:
        R2SweepError: no such sweep, or no finished trial yet.
    """
    return best_trial(tracker, *read_sweep(tracker, name))


def best_trial(tracker: Tracker, sweep: SweepRun, spec: SweepSpec) -> BestTrial:
    """:func:`pick_best` for a sweep already read (:func:`read_sweep`)."""
    finished = finished_runs(sweep.trial_runs(), spec.objective_metrics)
    if not finished:
        raise R2SweepError(f"sweep {sweep.name!r} has no finished trial with {spec.objectives[0].metric} yet")
    front = pareto_front(finished, spec) if spec.multi_objective else finished
    best = best_of(finished, spec)
    run_id = best.info.run_id
    text = _trial_config_text(tracker, run_id)
    return BestTrial(
        run_id=run_id,
        trial_id=best.data.tags.get(TAG_TRIAL_ID, ""),
        metrics=dict(best.data.metrics),
        params=dict(best.data.params),
        config=yaml.safe_load(text) if text is not None else None,
        config_text=text or "",
        front=[r.info.run_id for r in front] if spec.multi_objective else [run_id],
    )


def _trial_config_text(tracker: Tracker, run_id: str) -> str | None:
    """The run's trial config as stored, or None when the run has none (a trial whose upload failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(tracker.client.download_artifacts(run_id, TRIAL_CONFIG_ARTIFACT, tmp)).read_text()
        except Exception as error:  # noqa: BLE001 - MLflow's own kinds; only "no such artifact" is an answer
            if is_missing(error):
                return None
            raise


def select_best(
    tracker: Tracker,
    name: str,
    *,
    out: str | Path | None = None,
    register: bool = True,
) -> BestTrial:
    """:func:`pick_best`, then write its config to ``out``, tag it on the parent run, register its model.

    Raises:
        R2SweepError: no such sweep, or no finished trial yet.
    """
    sweep, spec = read_sweep(tracker, name)
    best = best_trial(tracker, sweep, spec)
    run_id = best.run_id
    if out is not None:
        if best.config is None:
            raise R2SweepError(f"the best trial's run {run_id} has no {TRIAL_CONFIG_ARTIFACT} artifact to write to {out} "
                               "(its upload failed?); re-run it from its MLflow params, or pass no --out")
        best.config_path = Path(out)
        best.config_path.parent.mkdir(parents=True, exist_ok=True)
        best.config_path.write_text(best.config_text)
    sweep.set_tags(sweep.parent_run_id, {TAG_BEST_RUN: run_id, TAG_BEST_TRIAL: best.trial_id})
    if register:
        try:
            best.model_version, best.model_uri = register_champion(sweep, run_id, f"r2sweep-{name}")
        except R2SweepError as error:  # the pick stands; only the registration has nothing to take
            best.notes.append(f"champion not registered: {error}")
    return best


def register_champion(sweep: SweepRun, run_id: str, model_name: str) -> tuple[str, str]:
    """Register the model the trial of ``run_id`` logged (its torch.export archive) as ``model_name``'s
    champion; ``(version, models:/NAME/VERSION)``. A champion that is that run already is kept as it is.

    Nothing the run holds is loaded as code: the archive is registered as it was logged, and the
    shapes for its signature come from the trial's ``pretrained.pt`` (tensors and numbers).

    Raises:
        R2SweepError: the run has no archive (its model could not be exported: its notes say why).
    """
    champion = sweep.champion(model_name)
    if champion is not None and champion.run_id == run_id:
        # The champion did not change: registering it again would add a copy
        # (a new model and a new version) of the same weights at every call.
        return str(champion.version), f"models:/{model_name}/{champion.version}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            archive = sweep.client.download_artifacts(run_id, MODEL_ARCHIVE, tmp)
        except Exception as error:  # noqa: BLE001 - MLflow's own kinds; only "no such artifact" is an answer
            if not is_missing(error):
                raise
            raise R2SweepError(f"the best trial's run {run_id} has no {MODEL_ARCHIVE}: its model could not be exported "
                               f"with torch.export (its {TAG_NOTES} tag says why), so there is no model to register; "
                               "its weights are in its pretrained.pt") from None
        saved = load_pretrained(sweep.client.download_artifacts(run_id, PRETRAINED, tmp))
        uri = sweep.log_model(run_id, archive, input_shape=saved.input_shape, num_classes=saved.num_classes)
    version = str(sweep.register_champion(run_id, model_name, uri).version)
    return version, f"models:/{model_name}/{version}"

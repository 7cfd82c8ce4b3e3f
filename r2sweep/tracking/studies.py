"""A study's own run in MLflow: the study file, its decisions and its page, beside the sweeps it ran.

A study (``r2sweep study``) is a plan of ordinary sweeps, each in its own experiment
(``NAME-baseline``, ``NAME-<kind>``). What groups them is one run in the experiment
of the study's name (role ``study``), holding the study file as it was started, and
the tag ``r2sweep.study = NAME`` on that run and on every sweep's parent run, so
``tags."r2sweep.study" = 'NAME'`` finds them all in the MLflow UI.

The study run is a :class:`SweepRun` whose "parent" is the study run: logging, tags
and registering a champion work on it as on a sweep.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException

from r2sweep import __version__
from r2sweep.tracking.names import (
    _ROLE_STUDY,
    STUDY_ARTIFACT,
    TAG_ROLE,
    TAG_STUDY,
    TAG_VERSION,
    user_tag,
)
from r2sweep.tracking.runs import SweepRun
from r2sweep.tracking.store import Tracker, TrackingError

__all__ = ["open_study", "find_study", "study_text"]


def find_study(tracker: Tracker, name: str) -> SweepRun | None:
    """The run of study ``name``, or None when the store holds no such study."""
    experiment_id = tracker._experiment_id(name, create=False)
    if experiment_id is None:
        return None
    with tracker._failing(f"search the run of study {name!r}"):
        runs = tracker.client.search_runs([experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{_ROLE_STUDY}'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
    return SweepRun(tracker, name, experiment_id, runs[0].info.run_id) if runs else None


def open_study(tracker: Tracker, name: str, text: str) -> SweepRun:
    """Study ``name``'s run: the existing one, or a new one holding ``text`` as :data:`STUDY_ARTIFACT`.

    Raises:
        TrackingError: the experiment of that name holds a sweep (a study needs its own name).
    """
    existing = find_study(tracker, name)
    if existing is not None:
        return existing
    if tracker.find_sweep(name) is not None:
        raise TrackingError(tracker.display_uri, f"start study {name!r}",
                            f"a sweep named {name!r} is there already; give the study another name")
    experiment_id = tracker._experiment_id(name, create=True)
    assert experiment_id is not None
    tags = {**user_tag(), TAG_ROLE: _ROLE_STUDY, TAG_STUDY: name, TAG_VERSION: __version__}
    with tracker._failing(f"create the run of study {name!r}"):
        run = tracker.client.create_run(experiment_id, tags=tags, run_name=name)
        tracker.client.log_text(run.info.run_id, text, STUDY_ARTIFACT)
    return SweepRun(tracker, name, experiment_id, run.info.run_id)


def study_text(study: SweepRun) -> str:
    """The study file as the study was started with it."""
    with tempfile.TemporaryDirectory() as tmp, study.tracker._failing(f"read the file of study {study.name!r}"):
        try:
            return Path(study.client.download_artifacts(study.parent_run_id, STUDY_ARTIFACT, tmp)).read_text()
        except MlflowException as error:
            raise TrackingError(study.tracker.display_uri, f"read study {study.name!r}",
                                f"its run {study.parent_run_id} holds no {STUDY_ARTIFACT}") from error

"""The MLflow runs of one sweep: its parent run, exactly one child run per trial, the champion.

:class:`SweepRun` is what :meth:`r2sweep.tracking.store.Tracker.start_sweep` returns;
everything goes through the tracker's client and explicit run ids (see
:mod:`r2sweep.tracking.store` for why), and every backend failure surfaces as the
tracker's :class:`~r2sweep.tracking.store.TrackingError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, Run, RunStatus, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from r2sweep.tracking.model_dir import write_model_dir
from r2sweep.tracking.names import (
    _END_STATUSES,
    _PAGE,
    _ROLE_CONFIRM,
    _ROLE_TRIAL,
    CHAMPION_ALIAS,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE,
    TAG_OUTCOME,
    TAG_PARENT_RUN,
    TAG_ROLE,
    TAG_SWEEP_NAME,
    TAG_TRIAL_ID,
    as_float,
    clip,
    filter_literal,
    now_ms,
    sanitize_key,
    user_tag,
)

if TYPE_CHECKING:  # tracking imports this module
    from r2sweep.tracking.store import Tracker

__all__ = ["SweepRun"]

_log = logging.getLogger(__name__)


@dataclass
class _KnownRun:
    """What opening a trial's run again needs: its id, its status, the params it holds."""

    run_id: str
    status: str
    params: dict[str, str]


class SweepRun:
    """The parent run of one sweep and the means to log its trials' child runs.

    Attributes:
        name: the sweep (and experiment) name.
        experiment_id: the MLflow experiment.
        parent_run_id: the parent run; children carry it in ``mlflow.parentRunId``.
    """

    def __init__(self, tracker: Tracker, name: str, experiment_id: str, parent_run_id: str) -> None:
        self.tracker = tracker
        self.name = name
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        # Two threads asking for the same new trial must not both create a run.
        self._lock = threading.Lock()
        # The trial runs this sweep has, by (role, trial id): read from the store once, then kept up to
        # date here, so that opening a trial's run costs the same for the ten-thousandth trial as for the
        # first (a search per trial scans every run of the experiment). Only this sweep's driver creates
        # its trial runs; re-runs (``confirm``) may come from other processes, so they are still searched.
        self._known: dict[tuple[str, str], _KnownRun] | None = None
        self._known_ids: dict[str, _KnownRun] = {}  # the same, by run id

    def __repr__(self) -> str:
        return f"SweepRun({self.name!r}, parent_run_id={self.parent_run_id!r}, uri={self.tracker.display_uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        state["_known"], state["_known_ids"] = None, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self) -> MlflowClient:
        return self.tracker.client

    def _failing(self, action: str) -> contextlib.AbstractContextManager[None]:
        return self.tracker._failing(action)

    # -- trials ---------------------------------------------------------------

    def trial_run(self, trial_id: str, params: Mapping[str, Any], *, confirm: bool = False) -> str:
        """The run id of trial ``trial_id``: found by its tag, or created; set RUNNING.

        Calling it again for the same trial (after a restore) returns the same run.
        Params are logged under their (dotted) names when missing from the run; a
        param the run already holds keeps its first value, since MLflow refuses to
        change one (a differing new value is reported in the log, not raised).
        ``confirm``: the run of a re-run on another seed, not a sweep trial.
        """
        action = f"open the run of trial {trial_id!r} in sweep {self.name!r}"
        role = _ROLE_CONFIRM if confirm else _ROLE_TRIAL
        with self._lock, self._failing(action):
            known = self._known_run(trial_id, role)
            if known is None:
                tags = {
                    **user_tag(),
                    TAG_ROLE: role,
                    TAG_TRIAL_ID: trial_id,
                    TAG_SWEEP_NAME: self.name,
                    TAG_PARENT_RUN: self.parent_run_id,
                }
                run = self.client.create_run(self.experiment_id, tags=tags, run_name=trial_id)
                known = self._remember(role, trial_id, run)
            elif known.status != "RUNNING":
                self.client.update_run(known.run_id, status="RUNNING")
                known.status = "RUNNING"
            known.params.update(self._log_new_params(known.run_id, trial_id, params, known.params))
            return known.run_id

    def _known_runs(self) -> dict[tuple[str, str], _KnownRun]:
        if self._known is None:
            self._known = {}
            for run in self._search(f"tags.`{TAG_PARENT_RUN}` = '{self.parent_run_id}'", "ASC"):
                self._remember(run.data.tags.get(TAG_ROLE, ""), run.data.tags.get(TAG_TRIAL_ID, ""), run)
        return self._known

    def _remember(self, role: str, trial_id: str, run: Run) -> _KnownRun:
        """Keep ``run`` as the run of (role, trial_id); the oldest one stays if two ever exist."""
        known = _KnownRun(run.info.run_id, run.info.status, dict(run.data.params))
        kept = self._known_runs().setdefault((role, trial_id), known)
        self._known_ids[kept.run_id] = kept
        if kept is not known:
            _log.warning("sweep %r: two runs for trial %r; using the oldest", self.name, trial_id)
        return kept

    def _known_run(self, trial_id: str, role: str = _ROLE_TRIAL) -> _KnownRun | None:
        known = self._known_runs().get((role, trial_id))
        if known is None and role == _ROLE_CONFIRM:
            run = self._find_trial(trial_id, role)
            known = None if run is None else self._remember(role, trial_id, run)
        return known

    def _find_trial(self, trial_id: str, role: str) -> Run | None:
        literal = filter_literal(trial_id)
        filter_string = f"tags.`{TAG_PARENT_RUN}` = '{self.parent_run_id}' AND tags.`{TAG_ROLE}` = '{role}'"
        if literal is not None:
            filter_string += f" AND tags.`{TAG_TRIAL_ID}` = {literal}"
        # Oldest first: if two runs ever exist for one trial, always the same one wins.
        runs = [run for run in self._search(filter_string, "ASC") if run.data.tags.get(TAG_TRIAL_ID) == trial_id]
        return runs[0] if runs else None

    def _log_new_params(self, run_id: str, trial_id: str, params: Mapping[str, Any],
                        existing: Mapping[str, str]) -> dict[str, str]:
        """Log the params the run does not hold yet; return them."""
        new: list[Param] = []
        for key, value in params.items():
            name, text = sanitize_key(key), clip(value, MAX_PARAM_VALUE)
            if name not in existing:
                new.append(Param(name, text))
            elif existing[name] != text:
                _log.warning(
                    "trial %r: param %r keeps its logged value %r (MLflow params are immutable); %r not logged",
                    trial_id,
                    name,
                    existing[name],
                    text,
                )
        for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[start : start + MAX_PARAMS_PER_BATCH])
        return {param.key: param.value for param in new}

    def forget_trial(self, trial_id: str) -> None:
        """Delete the run of a trial the sweep no longer has (MLflow keeps it in the trash).

        Used after a driver crash for trials started after the last experiment
        snapshot: Tune restarts without them and samples their slots anew.
        """
        with self._lock, self._failing(f"remove the run of lost trial {trial_id!r} from sweep {self.name!r}"):
            known = self._known_runs().get((_ROLE_TRIAL, trial_id))
            if known is not None:
                self.client.set_tag(known.run_id, TAG_OUTCOME, "lost")
                if known.status == "RUNNING":
                    self.client.set_terminated(known.run_id, status="KILLED")
                self.client.delete_run(known.run_id)
                # Forgotten only once deleted: a failure above is retried with the run still known.
                del self._known_runs()[(_ROLE_TRIAL, trial_id)]
                del self._known_ids[known.run_id]

    def trial_runs(self) -> list[Run]:
        """Every trial run of this sweep, oldest first."""
        with self._failing(f"list the trial runs of sweep {self.name!r}"):
            return self._search(
                f"tags.`{TAG_PARENT_RUN}` = '{self.parent_run_id}' AND tags.`{TAG_ROLE}` = '{_ROLE_TRIAL}'", "ASC"
            )

    def confirm_runs(self) -> list[Run]:
        """Every re-run of this sweep's trials on other seeds (``r2sweep confirm``), oldest first."""
        with self._failing(f"list the re-runs of sweep {self.name!r}"):
            return self._search(
                f"tags.`{TAG_PARENT_RUN}` = '{self.parent_run_id}' AND tags.`{TAG_ROLE}` = '{_ROLE_CONFIRM}'", "ASC"
            )

    def _search(self, filter_string: str, order: str) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                order_by=[f"attributes.start_time {order}"],
                max_results=_PAGE,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    # -- logging (works for the parent run id too) ---------------------------

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, Any], step: int | None = None, timestamp: int | None = None
    ) -> dict[str, float]:
        """Log the finite numeric values of ``metrics``; return what was logged, by MLflow name.

        Non-numeric and non-finite values (a diverged loss) are skipped: MLflow
        would store NaN, which breaks sorting and "best run" queries. A given
        ``timestamp`` (ms) makes a repeated call an exact duplicate, which MLflow's
        SQL store ignores: a replay never doubles a metric.
        """
        logged: dict[str, float] = {}
        for key, value in metrics.items():
            number = as_float(value)
            if number is not None:
                logged[sanitize_key(key)] = number
        timestamp = now_ms() if timestamp is None else int(timestamp)
        batch = [Metric(key, value, timestamp, step or 0) for key, value in logged.items()]
        with self._failing(f"log {len(batch)} metrics to run {run_id}"):
            for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH])
        return logged

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store ``text`` as artifact ``artifact_file`` (e.g. ``trial_config.yaml``) of the run."""
        with self._failing(f"log artifact {artifact_file!r} to run {run_id}"):
            self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a local file or folder (its contents) to the run's artifacts."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"cannot log artifact {local}: no such file or folder")
        with self._failing(f"log artifact {local} to run {run_id}"):
            if local.is_dir():
                self.client.log_artifacts(run_id, str(local), artifact_path)
            else:
                self.client.log_artifact(run_id, str(local), artifact_path)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags of the run; values are stored as text."""
        batch = [RunTag(sanitize_key(key), clip(value, MAX_TAG_VALUE)) for key, value in tags.items()]
        with self._failing(f"set tags on run {run_id}"):
            for start in range(0, len(batch), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(run_id, tags=batch[start : start + MAX_PARAMS_PER_BATCH])

    # -- ending ---------------------------------------------------------------

    def end_trial(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate a trial run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        status = _check_status(status)
        with self._failing(f"end run {run_id} as {status}"):
            self.client.set_terminated(run_id, status=status)
        if run_id in self._known_ids:
            self._known_ids[run_id].status = status

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the sweep: children still open become KILLED, the parent gets ``status``."""
        status = _check_status(status)
        with self._failing(f"end sweep {self.name!r}"):
            for run in self.trial_runs():
                if not RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
                    self.client.set_terminated(run.info.run_id, status="KILLED")
            self.client.set_terminated(self.parent_run_id, status=status)

    # -- models ---------------------------------------------------------------

    def log_model(
        self,
        run_id: str,
        archive: str | os.PathLike[str],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        name: str = "model",
        step: int = 0,
    ) -> str:
        """Log a trial's torch.export ``archive`` as an MLflow 3 LoggedModel of the run; return its
        ``models:/<id>`` URI. The archive is copied as it is (:mod:`r2sweep.tracking.model_dir`):
        nothing in it is loaded or run here. ``input_shape`` is one sample's shape."""
        with self._failing(f"log model {name!r} to run {run_id}"):
            run = self.client.get_run(run_id)
            logged = self.client.create_logged_model(
                run.info.experiment_id,
                name=name,
                source_run_id=run_id,
                params={key: clip(value, MAX_PARAM_VALUE) for key, value in run.data.params.items()},
            )
            try:
                self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
                with tempfile.TemporaryDirectory(prefix="r2sweep-model-") as tmp:
                    local = os.path.join(tmp, "model")
                    mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                         run_id=run_id, model_id=logged.model_id)
                    write_model_dir(archive, local, mlflow_model, input_shape=input_shape, num_classes=num_classes)
                    self.client.log_model_artifacts(logged.model_id, local)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.client.finalize_logged_model(logged.model_id, "FAILED")
                raise
            self.client.finalize_logged_model(logged.model_id, "READY")
        return f"models:/{logged.model_id}"

    def champion(self, model_name: str, alias: str = CHAMPION_ALIAS) -> ModelVersion | None:
        """The version ``alias`` of registered model ``model_name`` points at; None when either is missing."""
        with self._failing(f"look up {model_name!r}@{alias}"):
            try:
                return self.client.get_model_version_by_alias(model_name, alias)
            except MlflowException as exc:
                if exc.get_http_status_code() == 404:  # no such model, or no such alias on it
                    return None
                raise

    def register_champion(
        self,
        run_id: str,
        model_name: str,
        model_uri: str,
        *,
        alias: str = CHAMPION_ALIAS,
    ) -> ModelVersion:
        """Register ``model_uri`` as a new version of ``model_name`` and point ``alias`` at it.

        The registered model is created on first use. Returns the new version
        (``.version`` is its number); the alias moves from any older version.
        """
        with self._failing(f"register {model_uri} as {model_name!r}@{alias}"):
            try:
                self.client.create_registered_model(model_name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            # "models:/<model id>" names a LoggedModel (what log_model returns);
            # "models:/<name>/<version>" or "models:/<name>@<alias>" name registry entries.
            match = re.fullmatch(r"models:/([^/@]+)", model_uri)
            model_id = match.group(1) if match else None
            source = model_uri
            if model_id is not None:
                # Pass the storage location, not the models:/ URI: MLflow's SQL registry
                # store resolves a models:/ source with the *global* tracking URI
                # (a TODO in its code), so it looks in the wrong database.
                source = self.client.get_logged_model(model_id).artifact_location
            version = self.client.create_model_version(
                model_name,
                source=source,
                run_id=run_id,
                tags={TAG_SWEEP_NAME: self.name},
                model_id=model_id,
            )
            self.client.set_registered_model_alias(model_name, alias, version.version)
        return version


def _check_status(status: str) -> str:
    upper = status.upper()
    if upper not in _END_STATUSES:
        raise ValueError(f"status={status!r} is not valid: one of {', '.join(_END_STATUSES)}")
    return upper

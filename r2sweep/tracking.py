"""MLflow adapter of the sweep: one parent run per sweep, exactly one child run per trial.

Why r2sweep manages runs itself instead of using Ray's ``MLflowLoggerCallback``:
that callback opens a *new* run for a trial restored after a driver crash and
leaves the old one RUNNING forever. Here a trial's run is found again by its
``r2sweep.trial_id`` tag and reused, so a restored sweep still has one run per
trial, and :meth:`SweepRun.end` leaves no run RUNNING.

Everything goes through an explicit :class:`~mlflow.MlflowClient` and explicit
run ids, never through ``mlflow.set_tracking_uri`` or the fluent "active run":
the sweep driver handles several trials at once from one callback, and a global
active run would attribute one trial's metrics to another.

This is the only r2sweep module that imports MLflow, with its helper
:mod:`r2sweep.tracking_errors` (which failures are worth retrying); nothing in
the core imports either, so a trial runs without MLflow installed. Every failure
of the tracking backend surfaces as a :class:`TrackingError` that names the
tracking URI, what was being done, and a hint (server unreachable, credentials refused).

The local default is a SQLite store: MLflow 3's plain-file store (``./mlruns``)
refuses to start unless ``MLFLOW_ALLOW_FILE_STORE=true``.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, Run, RunStatus, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from torch import nn

from r2sweep import __version__
from r2sweep.errors import R2SweepError
from r2sweep.outcome import TAG_OUTCOME as OUTCOME_TAG

__all__ = [
    "redact_uri",
    "DEFAULT_TRACKING_URI",
    "SPEC_ARTIFACT",
    "TAG_ROLE",
    "TAG_SWEEP_NAME",
    "TAG_TRIAL_ID",
    "TAG_OUTCOME",
    "TAG_VERSION",
    "TAG_GIT_COMMIT",
    "TAG_GIT_DIRTY",
    "TAG_PARENT_RUN",
    "CHAMPION_ALIAS",
    "TrackingError",
    "Tracker",
    "SweepRun",
    "sanitize_key",
]

_log = logging.getLogger(__name__)

#: A SQLite file in the working directory: works out of the box, one file to copy.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: The sweep specification, as text, in the parent run's artifacts.
SPEC_ARTIFACT = "sweep.yaml"
CHAMPION_ALIAS = "champion"

TAG_ROLE = "r2sweep.role"  # "sweep" on the parent, "trial" on each child, "confirm" on a re-run
TAG_SWEEP_NAME = "r2sweep.sweep_name"
TAG_TRIAL_ID = "r2sweep.trial_id"
#: How a trial ended: finished, stopped, diverged, failed, or lost (forgotten by Tune after a crash).
TAG_OUTCOME = OUTCOME_TAG  # decided in r2sweep.outcome
TAG_VERSION = "r2sweep.version"
# MLflow's own tag names, so that the UI shows the commit and nests the runs.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "r2sweep.git_dirty"
TAG_PARENT_RUN = "mlflow.parentRunId"
_TAG_USER = "mlflow.user"

_ROLE_SWEEP = "sweep"
_ROLE_TRIAL = "trial"
# A sweep trial's configuration re-run on another seed (``r2sweep confirm``): a child
# of the sweep too, but never one of its trials (compare, report and best ignore it).
_ROLE_CONFIRM = "confirm"
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow/utils/validation.py); exceeding them rejects the whole batch.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_PAGE = 1000
# The reachability probe's timeout (s): DNS, connect and a first answer, in one try.
_PROBE_TIMEOUT_S = 10
# What MLflow accepts in a metric/param/tag name on every server OS (the colon is
# refused on Windows servers, so it is replaced too).
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_./ \-]")


class TrackingError(R2SweepError, RuntimeError):
    """The tracking backend failed: unreachable, refused the credentials, or rejected a call.

    Args:
        uri: the tracking URI in use.
        action: what was being done, e.g. ``"create the run of trial 'a_00001'"``.
        reason: the backend's message (shortened).
    """

    def __init__(self, uri: str, action: str, reason: str) -> None:
        self.uri = uri
        self.action = action
        self.reason = reason
        super().__init__(f"MLflow at {uri}: could not {action}: {reason}")


def sanitize_key(key: str) -> str:
    """Turn ``key`` into a name MLflow accepts for a metric, param or tag.

    Slashes stay (``ptq_adaround_w2a8/top1`` is a valid, grouped name); other
    characters MLflow refuses become ``_``; empty, ``.`` and ``..`` path segments
    are removed or escaped, because MLflow rejects names that would resolve to
    another path (``a//b``, ``/a``, ``a/../b``).
    """
    cleaned = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [("__" if part == ".." else part) for part in cleaned.split("/") if part not in ("", ".")]
    result = "/".join(parts)[:_MAX_KEY].rstrip("/")
    return result or "_"


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything MLflow cannot plot."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)  # ints, bools, NumPy scalars, one-element tensors
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def _filter_literal(value: str) -> str | None:
    # MLflow's filter grammar has no escape for quotes: a value with one cannot
    # be matched server-side, and callers fall back to matching in Python.
    if "'" in value or '"' in value or "\\" in value:
        return None
    return f"'{value}'"


def _hint(exc: BaseException) -> str:
    """One sentence on what probably went wrong, read off MLflow's message."""
    text = str(exc)
    status = exc.get_http_status_code() if isinstance(exc, MlflowException) else None
    if status in (401, 403) or re.search(r"\b(401|403)\b|UNAUTHENTICATED|PERMISSION_DENIED|Unauthorized", text):
        return (
            " (the server refused the credentials: check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
            " or MLFLOW_TRACKING_TOKEN)"
        )
    if re.search(r"Max retries exceeded|Connection refused|Failed to establish|timed out|NameResolution", text):
        return (
            " (is the tracking server running and reachable from here? MLflow retried"
            " MLFLOW_HTTP_REQUEST_MAX_RETRIES times with a timeout of MLFLOW_HTTP_REQUEST_TIMEOUT s)"
        )
    if "unable to open database file" in text:
        return " (the SQLite file's folder must exist and be writable)"
    return ""


_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^/\s]*)@")


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it masked."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def _short(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _git_tags() -> dict[str, str]:
    """The commit of the working directory's checkout, when there is one; never fails."""
    tags: dict[str, str] = {}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if head.returncode != 0:
            return tags
        tags[TAG_GIT_COMMIT] = head.stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if status.returncode == 0:
            # A commit alone would claim a reproducibility that local edits break.
            tags[TAG_GIT_DIRTY] = "true" if status.stdout.strip() else "false"
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout: the run is still worth tracking
    return tags


def _user_tag() -> dict[str, str]:
    # MlflowClient.create_run records the user only from this tag ("unknown" otherwise).
    try:
        return {_TAG_USER: getpass.getuser()}
    except Exception:  # getpass raises various errors in containers without a passwd entry
        return {}


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///relative.db`` resolved against the working directory now.

    MLflow caches one store per URI string for the life of the process, so a
    relative SQLite URI keeps pointing into the directory of its first use even
    after the process changes directory (a test, a notebook, a second CLI call
    in one process). Other URIs pass through.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and not uri.startswith(prefix + ":memory:"):
        path, query = uri[len(prefix):].partition("?")[::2]
        return prefix + str(Path(path).resolve()) + (f"?{query}" if query else "")
    return uri


class Tracker:
    """Connection to one MLflow tracking backend (a SQLite file or a server).

    Args:
        tracking_uri: ``sqlite:///path.db``, ``http(s)://host:port``, ...; None:
            :data:`DEFAULT_TRACKING_URI` (``mlflow.db`` in the working directory).
            Credentials for a server come from MLflow's usual environment variables
            (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``).
        registry_uri: where registered models live; None: the tracking URI.
        artifact_location: artifact location of the experiments this tracker
            creates, e.g. ``s3://bucket/r2sweep``; None: the backend's default (a
            server's ``--artifacts-destination``); for a SQLite store, ``mlruns/``
            beside the database file, one folder per experiment (MLflow's own default
            is ``./mlruns`` in whatever directory the process runs in, which scatters
            one store's artifacts over every directory a sweep was started from).

    A Tracker pickles to its URIs alone (the client is rebuilt on first use), so
    a Ray Tune callback holding one survives being saved in ``tuner.pkl``.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        registry_uri: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.registry_uri = registry_uri or self.tracking_uri
        self.artifact_location = artifact_location
        self._client: MlflowClient | None = None

    def _experiment_artifacts(self, name: str) -> str | None:
        """Where a new experiment's artifacts go: the configured location, or beside a SQLite file."""
        if self.artifact_location is not None:
            return self.artifact_location
        uri = _absolute_sqlite(self.tracking_uri)
        if not uri.startswith("sqlite:////"):
            return None  # a server (or an in-memory store) decides itself
        folder = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        return str(Path(uri.removeprefix("sqlite:///").partition("?")[0]).parent / "mlruns" / folder)

    def __repr__(self) -> str:
        return f"Tracker({self.display_uri!r})"

    @property
    def display_uri(self) -> str:
        """The tracking URI with any password in it replaced by ``***`` (safe to print or log)."""
        return redact_uri(self.tracking_uri)

    @property
    def location(self) -> str:
        """Which store this is, independent of the working directory: the display URI,
        a relative SQLite path made absolute. Two trackers with one location log to one store."""
        return redact_uri(_absolute_sqlite(self.tracking_uri))

    def pinned(self) -> Tracker:
        """This tracker with relative SQLite paths resolved now.

        For a tracker that is pickled and used later from another directory: Tune
        restores a sweep's callbacks as they were pickled, in the resuming driver's
        working directory, where ``sqlite:///mlflow.db`` would name another file.
        """
        return Tracker(_absolute_sqlite(self.tracking_uri), registry_uri=_absolute_sqlite(self.registry_uri),
                       artifact_location=self.artifact_location)

    def check_access(self) -> None:
        """Fail now, before a sweep starts, if the store is unreachable or refuses us.

        A wrong password would otherwise surface only once Ray is up and trials
        are scheduled. MLflow's client retries transient server errors (408, 429,
        5xx, dropped connections) with exponential backoff on every request
        (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, about four minutes), so
        every later call rides out a server restart. A server that does not
        answer at all is told first, by one request without retries: a wrong
        address or a server that was never started fails in seconds, not minutes.

        Raises:
            TrackingError: naming the server (without credentials) and the fix.
        """
        if not self.tracking_uri.startswith(("http://", "https://")):
            return  # a local store has no credentials, and probing it would create its file
        self._probe()
        with self._failing("reach the tracking store"):
            self.client.search_experiments(max_results=1)

    def _probe(self) -> None:
        """One request, no retries, a short timeout: any HTTP answer means the server is there.

        Through MLflow's own request function, so that the environment's
        credentials and TLS settings apply. MLflow's global retry settings are
        left alone: later calls of a sweep still ride out an outage.
        """
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            http_request(get_default_host_creds(self.tracking_uri), "/api/2.0/mlflow/experiments/search", "GET",
                         max_retries=0, backoff_factor=0, timeout=_PROBE_TIMEOUT_S, params={"max_results": 1})
        except (MlflowException, requests.RequestException, OSError) as exc:
            text = str(exc)
            if "Connection refused" in text:
                reason = "connection refused"
            elif re.search(r"NameResolution|Name or service not known|nodename nor servname|getaddrinfo failed", text):
                reason = "unknown host"
            elif re.search(r"timed out|[Tt]imeout", text):
                reason = f"no answer within {_PROBE_TIMEOUT_S} s"
            else:
                reason = redact_uri(_short(exc, 300))
            raise TrackingError(self.display_uri, "reach the tracking store", f"{reason} (one try, no retries); is the"
                                " tracking server running, and are its host, port and http/https right?") from exc

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        """The MLflow client bound to this tracker's URIs (never the global tracking URI)."""
        if self._client is None:
            with self._failing("connect"):
                self._client = MlflowClient(tracking_uri=_absolute_sqlite(self.tracking_uri),
                                            registry_uri=_absolute_sqlite(self.registry_uri))
        return self._client

    @contextlib.contextmanager
    def _failing(self, action: str) -> Iterator[None]:
        """Re-raise backend failures inside the block as :class:`TrackingError`."""
        try:
            yield
        except TrackingError:
            raise
        except (MlflowException, requests.RequestException, OSError) as exc:
            raise TrackingError(self.display_uri, action, redact_uri(_short(exc)) + _hint(exc)) from exc

    # -- sweeps ---------------------------------------------------------------

    def start_sweep(
        self,
        name: str,
        spec_text: str,
        *,
        tags: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> SweepRun:
        """Open the parent run of sweep ``name`` in the experiment of the same name.

        Args:
            name: sweep name; also the MLflow experiment (created if missing).
            spec_text: the sweep specification, logged as :data:`SPEC_ARTIFACT`.
                On ``resume`` the original artifact is kept.
            tags: extra tags of the parent run.
            resume: reuse the most recent parent run of the experiment (after a
                driver restart) and set it back to RUNNING, instead of creating one.

        Raises:
            TrackingError: the backend failed, the experiment is deleted, or
                ``resume`` found no sweep of that name.
        """
        extra = {sanitize_key(key): _clip(value, _MAX_TAG_VALUE) for key, value in (tags or {}).items()}
        if resume:
            sweep = self.find_sweep(name)
            if sweep is None:
                raise TrackingError(self.display_uri, f"resume sweep {name!r}", f"no sweep named {name!r} in {self.display_uri}")
            with self._failing(f"resume sweep {name!r}"):
                self.client.update_run(sweep.parent_run_id, status="RUNNING")
                if extra:
                    sweep.set_tags(sweep.parent_run_id, extra)
            return sweep

        experiment_id = self._experiment_id(name, create=True)
        assert experiment_id is not None
        run_tags = {
            **_user_tag(),
            **_git_tags(),
            **extra,
            TAG_ROLE: _ROLE_SWEEP,
            TAG_SWEEP_NAME: name,
            TAG_VERSION: __version__,
        }
        with self._failing(f"create the parent run of sweep {name!r}"):
            run = self.client.create_run(experiment_id, tags=run_tags, run_name=name)
            self.client.log_text(run.info.run_id, spec_text, SPEC_ARTIFACT)
        return SweepRun(self, name, experiment_id, run.info.run_id)

    def find_sweep(self, name: str) -> SweepRun | None:
        """The most recently started parent run of sweep ``name``, or None if there is none."""
        experiment_id = self._experiment_id(name, create=False)
        if experiment_id is None:
            return None
        with self._failing(f"search the runs of sweep {name!r}"):
            runs = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{TAG_ROLE}` = '{_ROLE_SWEEP}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        if not runs:
            return None
        return SweepRun(self, name, experiment_id, runs[0].info.run_id)

    def experiment_names(self) -> list[str]:
        """The active experiments' names (every sweep has one), sorted; MLflow's "Default" left out."""
        with self._failing("list the experiments"):
            return sorted(e.name for e in self.client.search_experiments() if e.name != "Default")

    def _experiment_id(self, name: str, *, create: bool) -> str | None:
        with self._failing(f"look up experiment {name!r}"):
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None and create:
                try:
                    return self.client.create_experiment(name, artifact_location=self._experiment_artifacts(name))
                except MlflowException as exc:
                    # Another driver created it between the two calls: use theirs.
                    if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                        raise
                    experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return None
        if experiment.lifecycle_stage != "active":
            if not create:
                return None
            raise TrackingError(
                self.display_uri,
                f"use experiment {name!r}",
                f"it is deleted; restore it (mlflow experiments restore --experiment-id {experiment.experiment_id})"
                " or choose another sweep name",
            )
        return experiment.experiment_id


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

    def __repr__(self) -> str:
        return f"SweepRun({self.name!r}, parent_run_id={self.parent_run_id!r}, uri={self.tracker.display_uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
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
            run = self._find_trial(trial_id, role)
            if run is None:
                tags = {
                    **_user_tag(),
                    TAG_ROLE: role,
                    TAG_TRIAL_ID: trial_id,
                    TAG_SWEEP_NAME: self.name,
                    TAG_PARENT_RUN: self.parent_run_id,
                }
                run = self.client.create_run(self.experiment_id, tags=tags, run_name=trial_id)
                existing: dict[str, str] = {}
            else:
                if run.info.status != "RUNNING":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                existing = run.data.params
            self._log_new_params(run.info.run_id, trial_id, params, existing)
            return run.info.run_id

    def _find_trial(self, trial_id: str, role: str = _ROLE_TRIAL) -> Run | None:
        literal = _filter_literal(trial_id)
        filter_string = f"tags.`{TAG_PARENT_RUN}` = '{self.parent_run_id}' AND tags.`{TAG_ROLE}` = '{role}'"
        if literal is not None:
            filter_string += f" AND tags.`{TAG_TRIAL_ID}` = {literal}"
        # Oldest first: if two runs ever exist for one trial, always the same one wins.
        runs = [run for run in self._search(filter_string, "ASC") if run.data.tags.get(TAG_TRIAL_ID) == trial_id]
        if len(runs) > 1:
            _log.warning("sweep %r: %d runs for trial %r; using the oldest", self.name, len(runs), trial_id)
        return runs[0] if runs else None

    def _log_new_params(self, run_id: str, trial_id: str, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        new: list[Param] = []
        for key, value in params.items():
            name, text = sanitize_key(key), _clip(value, _MAX_PARAM_VALUE)
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
        for start in range(0, len(new), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[start : start + _MAX_PARAMS_PER_BATCH])

    def forget_trial(self, trial_id: str) -> None:
        """Delete the run of a trial the sweep no longer has (MLflow keeps it in the trash).

        Used after a driver crash for trials started after the last experiment
        snapshot: Tune restarts without them and samples their slots anew.
        """
        with self._lock, self._failing(f"remove the run of lost trial {trial_id!r} from sweep {self.name!r}"):
            run = self._find_trial(trial_id)
            if run is not None:
                self.client.set_tag(run.info.run_id, TAG_OUTCOME, "lost")
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.delete_run(run.info.run_id)

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
            number = _as_float(value)
            if number is not None:
                logged[sanitize_key(key)] = number
        timestamp = _now_ms() if timestamp is None else int(timestamp)
        batch = [Metric(key, value, timestamp, step or 0) for key, value in logged.items()]
        with self._failing(f"log {len(batch)} metrics to run {run_id}"):
            for start in range(0, len(batch), _MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=batch[start : start + _MAX_METRICS_PER_BATCH])
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
        batch = [RunTag(sanitize_key(key), _clip(value, _MAX_TAG_VALUE)) for key, value in tags.items()]
        with self._failing(f"set tags on run {run_id}"):
            for start in range(0, len(batch), _MAX_PARAMS_PER_BATCH):
                self.client.log_batch(run_id, tags=batch[start : start + _MAX_PARAMS_PER_BATCH])

    # -- ending ---------------------------------------------------------------

    def end_trial(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate a trial run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        status = _check_status(status)
        with self._failing(f"end run {run_id} as {status}"):
            self.client.set_terminated(run_id, status=status)

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
        model: nn.Module,
        input_example: np.ndarray,
        *,
        name: str = "model",
        step: int = 0,
        serialization_format: str = "pt2",
    ) -> str:
        """Log ``model`` as an MLflow 3 LoggedModel of the run; return its ``models:/<id>`` URI.

        ``input_example`` (an array of the model's input shape, e.g. one batch)
        is required: the default ``pt2`` format traces the model with it
        (``torch.export``), and it also gives the model a signature. Use
        ``serialization_format="pickle"`` for a model ``torch.export`` cannot trace.

        ``mlflow.pytorch.log_model`` is not used: it resolves the *global*
        tracking URI. The same steps are taken with this tracker's client.
        """
        with self._failing(f"log model {name!r} to run {run_id}"):
            run = self.client.get_run(run_id)
            logged = self.client.create_logged_model(
                run.info.experiment_id,
                name=name,
                source_run_id=run_id,
                params={key: _clip(value, _MAX_PARAM_VALUE) for key, value in run.data.params.items()},
            )
            try:
                self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
                with tempfile.TemporaryDirectory(prefix="r2sweep-model-") as tmp:
                    local = os.path.join(tmp, "model")
                    mlflow.pytorch.save_model(
                        model,
                        local,
                        mlflow_model=Model(
                            artifact_path=logged.artifact_location,
                            model_uuid=logged.model_id,
                            run_id=run_id,
                            model_id=logged.model_id,
                        ),
                        input_example=input_example,
                        serialization_format=serialization_format,
                        # Explicit requirements skip MLflow's inference, which loads the
                        # model again in a fresh Python process (seconds per model).
                        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                    )
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

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

This module (the connection, the store, the experiments) and its siblings are
the only r2sweep modules that import MLflow: :mod:`r2sweep.tracking.runs` (a
sweep's parent and trial runs, the champion), :mod:`r2sweep.tracking.names`
(the tag names and MLflow's limits; no MLflow import), :mod:`r2sweep.tracking.errors`
(which failures are worth retrying). Nothing in the core imports them, so a trial runs without MLflow installed. Every failure
of the tracking backend surfaces as a :class:`TrackingError` that names the
tracking URI, what was being done, and a hint (server unreachable, credentials refused).

The local default is a SQLite store: MLflow 3's plain-file store (``./mlruns``)
refuses to start unless ``MLFLOW_ALLOW_FILE_STORE=true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from r2sweep import __version__
from r2sweep.core.errors import R2SweepError
from r2sweep.core.locations import redact_uri
from r2sweep.tracking.names import (
    _ROLE_SWEEP,
    CHAMPION_ALIAS,
    DEFAULT_TRACKING_URI,
    MAX_TAG_VALUE,
    SPEC_ARTIFACT,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_OUTCOME,
    TAG_PARENT_RUN,
    TAG_ROLE,
    TAG_SWEEP_NAME,
    TAG_TRIAL_ID,
    TAG_VERSION,
    absolute_sqlite,
    clip,
    sanitize_key,
    short_text,
    user_tag,
)
from r2sweep.tracking.schema_lock import schema_lock

# Stores MLflow opens itself (their schema made on first use); a server makes its own.
_DATABASE_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")

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


# The reachability probe's timeout (s): DNS, connect and a first answer, in one try.
_PROBE_TIMEOUT_S = 10


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
        # Against a server MLflow prints "View run ... at: URL" for every run it ends: two
        # lines per trial between r2sweep's progress lines. The report links the runs.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.artifact_location = artifact_location
        self._client: MlflowClient | None = None

    def _experiment_artifacts(self, name: str) -> str | None:
        """Where a new experiment's artifacts go: the configured location, or beside a SQLite file."""
        if self.artifact_location is not None:
            return self.artifact_location
        database = self.sqlite_file
        if database is None:
            return None  # a server (or an in-memory store) decides itself
        folder = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        database = database if database.is_absolute() else database.resolve()  # as absolute_sqlite resolves it
        return str(database.parent / "mlruns" / folder)

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
        return redact_uri(absolute_sqlite(self.tracking_uri))

    @property
    def is_server(self) -> bool:
        """Whether the store is a tracking server (http/https), not a database or file this process opens."""
        return self.tracking_uri.startswith(("http://", "https://"))

    @property
    def sqlite_file(self) -> Path | None:
        """The database file of a local SQLite store (as the URI names it: relative to the working
        directory unless absolute), else None."""
        uri = self.tracking_uri
        if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
            return None
        return Path(uri.removeprefix("sqlite:///").partition("?")[0])

    def pinned(self) -> Tracker:
        """This tracker with relative SQLite paths resolved now.

        For a tracker that is pickled and used later from another directory: Tune
        restores a sweep's callbacks as they were pickled, in the resuming driver's
        working directory, where ``sqlite:///mlflow.db`` would name another file.
        """
        return Tracker(absolute_sqlite(self.tracking_uri), registry_uri=absolute_sqlite(self.registry_uri),
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
        if not self.is_server:
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
                reason = redact_uri(short_text(exc, 300))
            raise TrackingError(self.display_uri, "reach the tracking store", f"{reason} (one try, no retries); is the"
                                " tracking server running, and are its host, port and http/https right?") from exc

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        """The MLflow client bound to this tracker's URIs (never the global tracking URI)."""
        if self._client is None:
            uri = absolute_sqlite(self.tracking_uri)
            with self._failing("connect"), schema_lock(uri):
                client = MlflowClient(tracking_uri=uri, registry_uri=absolute_sqlite(self.registry_uri))
                if uri.startswith(_DATABASE_SCHEMES):
                    client.search_experiments(max_results=1)  # opens the store: creates or migrates its schema
                self._client = client
        return self._client

    @contextlib.contextmanager
    def _failing(self, action: str) -> Iterator[None]:
        """Re-raise backend failures inside the block as :class:`TrackingError`."""
        try:
            yield
        except TrackingError:
            raise
        except (MlflowException, requests.RequestException, OSError) as exc:
            raise TrackingError(self.display_uri, action, redact_uri(short_text(exc)) + _hint(exc)) from exc

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
        extra = {sanitize_key(key): clip(value, MAX_TAG_VALUE) for key, value in (tags or {}).items()}
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
            **user_tag(),
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


from r2sweep.tracking.runs import SweepRun  # noqa: E402 - it needs the names above

"""What MLflow accepts, and what may be shown: key names, value limits, URIs without passwords.

Pure text rules, no MLflow import, so that the CLI can redact a URI or name a
key before (or without) loading MLflow. :mod:`r2sweep.tracking.store` applies them to
every call it makes.
"""

from __future__ import annotations

import getpass
import math
import re
import time
from pathlib import Path
from typing import Any

from r2sweep.core.outcome import TAG_OUTCOME as OUTCOME_TAG

__all__ = ["sanitize_key", "absolute_sqlite", "MAX_PARAM_VALUE", "MAX_TAG_VALUE",
           "MAX_PARAMS_PER_BATCH", "MAX_METRICS_PER_BATCH",
           "TAG_TEXT_PREFIX", "TAG_NOTES", "TAG_PRETRAIN_CACHE", "user_tag", "clip", "as_float", "filter_literal", "now_ms", "short_text"]

#: A SQLite file in the working directory: works out of the box, one file to copy.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: The sweep specification, as text, in the parent run's artifacts.
SPEC_ARTIFACT = "sweep.yaml"
CHAMPION_ALIAS = "champion"

TAG_ROLE = "r2sweep.role"  # "sweep" on the parent, "trial" on each child, "confirm" on a re-run
TAG_SWEEP_NAME = "r2sweep.sweep_name"
#: On the parent run: where Tune keeps the sweep (its Optuna study's default place is beside it).
TAG_EXPERIMENT_PATH = "r2sweep.experiment_path"
#: On the parent run of a sweep started with --start-from: the earlier sweep and the top K taken.
TAG_START_FROM = "r2sweep.start_from"
TAG_TRIAL_ID = "r2sweep.trial_id"
#: On the runs of a study (r2sweep study): the study's run, each of its sweeps' parent runs.
TAG_STUDY = "r2sweep.study"
#: On a study's control re-run: which control (r2_off, r2_on_baseline) and the winner it controls.
TAG_CONTROL = "r2sweep.control"
TAG_CONTROL_OF = "r2sweep.control_of"
#: The study file, as text, in the study run's artifacts.
STUDY_ARTIFACT = "study.yaml"
#: How a trial ended: finished, stopped, diverged, failed, or lost (forgotten by Tune after a crash).
TAG_OUTCOME = OUTCOME_TAG  # decided in r2sweep.outcome
TAG_VERSION = "r2sweep.version"
# MLflow's own tag names, so that the UI shows the commit and nests the runs.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "r2sweep.git_dirty"
TAG_PARENT_RUN = "mlflow.parentRunId"
#: A trial's text results (r2sweep.core.trial.TEXT_RESULTS) are tagged r2sweep.<name>: r2sweep.notes
#: (a non-strict init_from's leftovers, a model torch.fx could not trace), r2sweep.pretrain_cache
#: (stored, hit, off, uncacheable), r2sweep.pretrain_key, r2sweep.pretrain_source (who trained the entry).
TAG_TEXT_PREFIX = "r2sweep."
TAG_NOTES = TAG_TEXT_PREFIX + "notes"
TAG_PRETRAIN_CACHE = TAG_TEXT_PREFIX + "pretrain_cache"
_TAG_USER = "mlflow.user"

_ROLE_SWEEP = "sweep"
_ROLE_STUDY = "study"  # the one run of a study, in the experiment of the study's name
_ROLE_TRIAL = "trial"
# A sweep trial's configuration re-run on another seed (``r2sweep confirm``): a child
# of the sweep too, but never one of its trials (compare, report and best ignore it).
_ROLE_CONFIRM = "confirm"
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PAGE = 1000  # runs per search page

# MLflow's limits (mlflow/utils/validation.py); exceeding them rejects the whole batch.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# What MLflow accepts in a metric/param/tag name on every server OS (the colon is
# refused on Windows servers, so it is replaced too).
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_./ \-]")


def sanitize_key(key: str) -> str:
    """Turn ``key`` into a name MLflow accepts for a metric, param or tag.

    Slashes stay (``ptq_adaround_w2a8/top1`` is a valid, grouped name); other
    characters MLflow refuses become ``_``; empty, ``.`` and ``..`` path segments
    are removed or escaped, because MLflow rejects names that would resolve to
    another path (``a//b``, ``/a``, ``a/../b``).
    """
    cleaned = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [("__" if part == ".." else part) for part in cleaned.split("/") if part not in ("", ".")]
    result = "/".join(parts)[:MAX_KEY].rstrip("/")
    return result or "_"


def clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now_ms() -> int:
    return int(time.time() * 1000)


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything MLflow cannot plot."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)  # ints, bools, NumPy scalars, one-element tensors
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def filter_literal(value: str) -> str | None:
    # MLflow's filter grammar has no escape for quotes: a value with one cannot
    # be matched server-side, and callers fall back to matching in Python.
    if "'" in value or '"' in value or "\\" in value:
        return None
    return f"'{value}'"


def short_text(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def absolute_sqlite(uri: str) -> str:
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


def user_tag() -> dict[str, str]:
    # MlflowClient.create_run records the user only from this tag ("unknown" otherwise).
    try:
        return {_TAG_USER: getpass.getuser()}
    except Exception:  # getpass raises various errors in containers without a passwd entry
        return {}

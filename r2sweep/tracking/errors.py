"""Which tracking failures are worth retrying: the one rule the tracking journal follows.

The journal (:mod:`r2sweep.tracking.journal`) retries a failed operation until
MLflow takes it, so that an outage costs no record. That is right for a store
that is away, and wrong for one that answered "never": retrying a value MLflow
will not accept stalls every later record of the sweep behind it. This module
tells the two apart, from what MLflow (or ``requests``) raised; it sits next to
:mod:`r2sweep.tracking.store`, the other module that reads MLflow's exceptions.
"""

from __future__ import annotations

import re

import requests
from mlflow.exceptions import MlflowException

__all__ = ["is_permanent", "is_missing"]

# 4xx statuses that mean "not now", not "not this": a request timeout (408), a
# client-side cancel (499), rate limiting (429). 401/403 are here too, on purpose:
# a rotated password or a revoked token is fixed outside the sweep, and treating
# it as permanent would skip (drop) every record from then on instead of waiting.
_RETRY_STATUSES = frozenset({401, 403, 408, 429, 499})
# MLflow error codes in the 4xx range with the same meaning: the endpoint itself is
# missing (a proxy lost its route to MLflow: every operation would be skipped),
# or a conflicting concurrent write aborted this one.
_RETRY_CODES = frozenset({"ENDPOINT_NOT_FOUND", "ABORTED", "CANCELLED"})
# A non-JSON error page (a proxy's 413, say) reaches us only as INTERNAL_ERROR
# with the real status in MLflow's message.
_STATUS_IN_MESSAGE = re.compile(r"failed with error code (\d{3}) != 200")


def _permanent_status(status: int) -> bool:
    return 400 <= status < 500 and status not in _RETRY_STATUSES


def is_permanent(error: BaseException) -> bool:
    """Whether the tracking store refused the operation itself, so that retrying it can never succeed.

    Permanent: MLflow answered with a client error (HTTP 4xx, e.g.
    ``INVALID_PARAMETER_VALUE`` for a metric sent to a deleted run,
    ``RESOURCE_DOES_NOT_EXIST``). Everything else is transient and retried:
    connection errors and timeouts, HTTP 5xx, 408, 429, refused credentials
    (401/403, see above), SQLite's "database is locked", and any failure that is
    not an answer from the store at all: retrying loses nothing, skipping does.

    Follows ``__cause__``: :class:`~r2sweep.tracking.store.TrackingError` wraps the
    MLflow or ``requests`` error it was raised from.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "database is locked" in str(current):
            # SQLite under a concurrent writer; SQLAlchemy may wrap it as a 400 (BAD_REQUEST).
            return False
        if isinstance(current, MlflowException):
            if current.error_code in _RETRY_CODES:
                return False
            status = current.get_http_status_code()
            if current.error_code == "INTERNAL_ERROR":
                match = _STATUS_IN_MESSAGE.search(current.message)
                status = int(match.group(1)) if match else status
            return _permanent_status(status)
        if isinstance(current, requests.HTTPError) and current.response is not None:
            return _permanent_status(current.response.status_code)
        current = current.__cause__
    return False


def is_missing(error: BaseException) -> bool:
    """Whether MLflow said the thing asked for does not exist (an artifact a run never logged)."""
    return isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST"

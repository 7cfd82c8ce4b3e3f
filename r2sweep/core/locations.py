"""Where a thing lives: a path on this machine or a URI. Decided here, once.

A value is a URI when it has a scheme (``s3://bucket/x``, ``file:///data``,
``http://host:5000``); anything else is a local path, made absolute against the
working directory *now* (a later ``chdir`` of a test or a notebook must not move
it). Every module that must tell the two apart (Tune's storage, an experiment
folder, the journal's place, a data root, an output beside the results) asks
these functions instead of looking for ``"://"`` itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["is_uri", "scheme_of", "absolute", "join", "redact_uri", "has_password"]

_SCHEME = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^/\s]*)@")


def is_uri(value: str | os.PathLike[str] | None) -> bool:
    """True for ``scheme://...``; False for a local path (or None)."""
    return value is not None and "://" in str(value)


def scheme_of(value: str) -> str:
    """The lower-case scheme of a URI (``"s3"``), or ``""`` for a local path."""
    match = _SCHEME.match(str(value))
    return match["scheme"].lower() if match else ""


def absolute(value: str | os.PathLike[str]) -> str:
    """A URI unchanged; a local path made absolute (resolved against the working directory now)."""
    return str(value) if is_uri(value) else str(Path(value).resolve())


def join(root: str | os.PathLike[str], name: str) -> str:
    """``root/name`` for a local folder (made absolute) or a URI."""
    return f"{absolute(root).rstrip('/')}/{name}"


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it masked."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def has_password(text: str) -> bool:
    """Whether ``text`` holds a ``scheme://user:password@host`` URI."""
    return bool(_URI_PASSWORD.search(str(text)))

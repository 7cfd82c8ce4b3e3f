"""The exceptions r2sweep raises on purpose.

Every error a user can cause by bad input is a :class:`ConfigError`: a
``ValueError`` whose message names the field, the value it got and what is
allowed, so that the fix can be read off the message alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["R2SweepError", "ConfigError", "FileConfigError", "DataNotFoundError", "TrialDiverged"]


class R2SweepError(Exception):
    """Base class of every exception raised deliberately by r2sweep."""


class ConfigError(R2SweepError, ValueError):
    """A field holds a value r2sweep cannot use.

    Args:
        field: dotted path of the field, e.g. ``"r2.strength"``.
        value: the offending value, shown with ``repr``.
        allowed: what would have been accepted, phrased for a person.
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not valid: {allowed}")


class FileConfigError(ConfigError):
    """A :class:`ConfigError` found in a named file: the message starts with the file.

    Keeps the field, value and what is allowed of the error it wraps, so a caller
    can still ask which field was wrong.
    """

    def __init__(self, file: str, error: ConfigError) -> None:
        self.file = file
        self.field = error.field
        self.value = error.value
        self.allowed = error.allowed
        Exception.__init__(self, f"{file}: {error}")


class DataNotFoundError(R2SweepError, FileNotFoundError):
    """A dataset's files are not where its ``root`` says (r2sweep never downloads)."""


class TrialDiverged(R2SweepError, RuntimeError):
    """Training produced a non-finite loss (too high a learning rate or R2 strength)."""

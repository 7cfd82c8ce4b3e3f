"""What the checks of command-line values share: their error, how they show a value, why a path is unusable.

:class:`OptionError` (a :class:`~r2sweep.core.errors.ConfigError`: exit status 2)
reads ``--option value: what is wrong and the fix``. The checks live in
:mod:`r2sweep.api.options`, :mod:`r2sweep.tracking.uri` and
:mod:`r2sweep.tune.ray_address`; this module imports neither Ray nor MLflow
at module level.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

from r2sweep.core.errors import ConfigError
from r2sweep.core.locations import is_uri

__all__ = ["OptionError"]

#: The longest file or folder name most file systems take (bytes, NAME_MAX).
_NAME_MAX = 255


def _shown(value: object) -> str:
    """``value`` as one would type it in a shell, on one line, and not too long."""
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    text = str(value)
    if "@" in text and is_uri(text):
        from r2sweep.core.locations import redact_uri

        text = redact_uri(text)
    if len(text) > 80:
        text = f"{text[:60]}...({len(text)} characters)"
    return shlex.quote(text) if text.isprintable() else repr(text)


class OptionError(ConfigError):
    """A command-line value r2sweep cannot use (a bad-input error: exit status 2).

    Args:
        option: ``--storage``, or an environment variable (``RAY_ADDRESS``) the option falls back to.
        value: the value as given.
        problem: what is wrong with it and the fix, phrased for a person.
    """

    def __init__(self, option: str, value: object, problem: str) -> None:
        self.field = option
        self.value = value
        self.allowed = problem
        shown = f"{option} {_shown(value)}" if option.startswith("-") or " " in option else f"{option}={_shown(value)}"
        Exception.__init__(self, f"{shown}: {problem}")


@contextlib.contextmanager
def _inspecting(option: str, value: object) -> Iterator[None]:
    """A path that cannot even be looked at (permission denied on a parent, say) is refused, not a traceback."""
    try:
        yield
    except OSError as error:
        raise OptionError(option, value, f"cannot be looked at ({error.strerror or error}); give another path") from None


def _from_env(value: str | None, option: str, env: str | None) -> tuple[str | None, str]:
    """(the value to check, its label): the option's value, else the environment variable it falls back to."""
    if value is None and env is not None and os.environ.get(env):
        return os.environ[env], env
    return value, option


# -- why a path cannot be used ------------------------------------------------


def _too_long(path: Path) -> str | None:
    for part in path.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            return (f"a name in it is {len(os.fsencode(part))} bytes long, more than the {_NAME_MAX} a file system "
                    "takes; shorten it")
    return None


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (its folder is created down from there)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _creatable(path: Path, what: str) -> str | None:
    """Why ``what`` (a folder, or a file's folder) cannot be created at ``path``; None if it can."""
    problem = _too_long(path)
    if problem:
        return problem
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, so no {what} can be created below it; give another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user, so no {what} can be created there; give a folder you can write to"
    return None


def _folder_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be (or become) the folder ``what``; None if it can."""
    problem = _too_long(path)
    if problem:
        return problem
    if path.exists() and not path.is_dir():
        return f"exists and is a file; give a folder for {what} (it is created if missing)"
    return _creatable(path, "folder")

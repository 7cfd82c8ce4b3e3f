"""Small checks shared by every config section, registry and builder.

Each raises :class:`~r2sweep.core.errors.ConfigError` naming the field, so a bad value
reads the same wherever it is caught.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any, Callable

from r2sweep.core.errors import ConfigError

__all__ = ["check", "is_number", "require_int", "reject_unknown"]


def check(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, value, allowed)


def is_number(value: Any) -> bool:
    """A finite int or float (booleans are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_int(field: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``, else a ConfigError."""
    allowed = f"an integer from {minimum} to {maximum}" if maximum is not None else f"an integer >= {minimum}"
    in_range = (
        not isinstance(value, bool)
        and isinstance(value, Integral)
        and value >= minimum
        and (maximum is None or value <= maximum)
    )
    check(in_range, field, value, allowed)
    return int(value)  # type: ignore[arg-type]


def reject_unknown(data: Mapping[str, Any], known: Sequence[str], field: Callable[[str], str], what: str = "field") -> None:
    """Raise a ConfigError for the first key of ``data`` not in ``known``, with a did-you-mean."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(field(str(key)), data[key], f"unknown {what}; {hint}known {what}s are {list(known)}")

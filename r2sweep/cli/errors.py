"""An error as the command line shows it: the API's keywords become the command's flags, here only.

The API and the core name an argument by its Python keyword (``tracking_uri='ftp://x'``,
``overrides['r2.kind']='none'``), whoever calls them. The command line prints the same
error with its own words (``--tracking-uri ftp://x``, ``--set r2.kind='none'``): this
module is the one place that translates, at the moment a command prints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from r2sweep.core.errors import ConfigError, FileConfigError
from r2sweep.core.option_errors import OptionError

__all__ = ["FLAGS", "command_line"]

#: Each API keyword and the flag that gives it.
FLAGS = {
    "storage": "--storage", "tracking_uri": "--tracking-uri", "address": "--address", "name": "--name",
    "start_from": "--start-from", "start_top": "--top", "out": "--out", "out_dir": "--out", "top": "--top",
    "seeds": "--seeds", "by": "--by", "metrics": "--metric", "pretrain_cache": "--pretrain-cache", "overrides": "--set",
}
_OVERRIDE = re.compile(r"overrides\['([^']*)'\]")


def _words(text: str) -> str:
    """``overrides['PATH']`` as ``--set PATH``, and the fix's "the override" as "the --set"."""
    return _OVERRIDE.sub(r"--set \1", text).replace("the override", "the --set")


def command_line(error: BaseException, *, positional: Mapping[str, str] = {}) -> str:
    """``error``'s message with the command's words. ``positional``: keywords a command takes as a
    positional argument, with how to name it (``{"name": "sweep name"}``)."""
    if not isinstance(error, ConfigError):
        return str(error)
    if isinstance(error, FileConfigError):  # a file's own fields are not options; its --set errors are
        field = FLAGS["overrides"] if error.field == "overrides" else _words(error.field)
        return str(FileConfigError(error.file, ConfigError(field, error.value, _words(error.allowed))))
    field = {**FLAGS, **positional}.get(error.field) or _words(error.field)
    kind = OptionError if isinstance(error, OptionError) else ConfigError
    return str(kind(field, error.value, _words(error.allowed)))

"""Checks of the values given on the command line, made before anything is created.

Each kind of value is checked in one function, which every command that takes
such a value calls: a storage location (:func:`storage`), a tracking URI
(:func:`tracking_uri`, from :mod:`r2sweep.tracking.uri`), a sweep name
(:func:`sweep_name`, :func:`sweep_to_read`), a Ray address (:func:`ray_address`;
its form is :func:`r2sweep.tune.ray_address.parse_ray_address`), an output
file (:func:`output_file`), an output folder (:func:`output_folder`), a count
(:func:`count`), seeds (:func:`seeds`) and a key (:func:`key`). Each returns the
value it accepted and raises :class:`~r2sweep.core.option_errors.OptionError` (a
:class:`~r2sweep.core.errors.ConfigError`: exit status 2) with the line
``--option value: what is wrong and the fix``.

The checks only look: they create no file or folder, start no Ray and open
no MLflow store, and they import neither Ray nor MLflow at module level, so a
refused value costs milliseconds.

Whether a Ray cluster answers is not checked here but where Ray is joined
(:func:`r2sweep.tune.ray_address.reach_ray`, called by
:func:`r2sweep.tune.cluster.connect`); its :class:`ClusterUnreachable` (exit
status 1) and the other names that lived here are still importable from here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlsplit

from r2sweep.core.errors import ConfigError
from r2sweep.core.locations import is_uri, scheme_of
from r2sweep.core.option_errors import _NAME_MAX, OptionError, _creatable, _folder_problem, _from_env, _inspecting, _too_long
from r2sweep.tracking.uri import tracking_uri
from r2sweep.tune.ray_address import ClusterUnreachable, RayAddress, parse_ray_address, reach_ray

__all__ = [
    "OptionError",
    "ClusterUnreachable",
    "RayAddress",
    "storage",
    "tracking_uri",
    "sweep_name",
    "sweep_to_read",
    "start_from",
    "ray_address",
    "parse_ray_address",
    "reach_ray",
    "output_file",
    "output_folder",
    "count",
    "seeds",
    "key",
]

#: A sweep name ends up in file names with a suffix: NAME-confirmed.yaml is the longest.
_SWEEP_NAME_MAX = _NAME_MAX - len("-confirmed.yaml")
#: np.random.seed takes 0 <= seed < 2**32, and a trial seeds NumPy with its seed.
_SEED_MAX = 2**32 - 1

_EXAMPLE_NAME = "e.g. --name r2-linf"


# -- files and folders --------------------------------------------------------


def output_folder(value: str | os.PathLike[str], option: str = "out", *, what: str = "the output") -> Path:
    """A folder a command writes into, created if missing.

    Refused: an empty value, an existing file, a path below a regular file, a
    folder this user cannot write, a name longer than a file system takes.
    """
    text = os.fspath(value)
    if not text.strip():
        raise OptionError(option, text, f"an empty path; give a folder for {what} (it is created if missing)")
    with _inspecting(option, text):
        problem = _folder_problem(Path(text), what)
    if problem:
        raise OptionError(option, text, problem)
    return Path(text)


def output_file(value: str | os.PathLike[str], option: str = "out", *, example: str = "best.yaml") -> Path:
    """A file a command writes (replaced if it exists; its folder is created if missing).

    Refused: an empty value, a path ending in ``/``, an existing folder, a path
    below a regular file, a place this user cannot write, a name too long.
    """
    text = os.fspath(value)
    if not text.strip():
        raise OptionError(option, text, f"an empty path; give a file, e.g. {example}")
    with _inspecting(option, text):
        return _output_file(Path(text), text, option, example)


def _output_file(path: Path, text: str, option: str, example: str) -> Path:
    if text.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise OptionError(option, text, f"names a folder; give a file, e.g. {Path(text, example)}")
    problem = _too_long(path)
    if problem:
        raise OptionError(option, text, problem)
    if path.is_dir():
        raise OptionError(option, text, f"is a folder; give a file, e.g. {path / example}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(option, text, "exists and is not writable by this user; give another file")
    problem = _creatable(path.parent, "file")
    if problem:
        raise OptionError(option, text, problem)
    return path


# -- Ray Tune's storage -------------------------------------------------------

#: URI schemes pyarrow's FileSystem.from_uri resolves, which is all Ray Tune uses for its storage path.
_STORAGE_SCHEMES = {"s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file", "local"}
#: Of those, the ones whose from_uri neither reaches the network nor loads a JVM (S3 looks the region up).
_OFFLINE_SCHEMES = {"gs", "gcs", "abfs", "abfss", "file", "local"}
_STORAGE_EXAMPLE = "e.g. --storage ./r2sweep_results or --storage s3://BUCKET/r2sweep"


def storage(value: str | None, option: str = "storage") -> str | None:
    """Ray Tune's storage path: a local folder, or a URI of a file system every node can reach.

    Refused: an empty value; a local path that is a file, lies below a file or
    cannot be created; a URI of a scheme pyarrow (thus Ray Tune) has no file
    system for (``foo://``, ``http://``), an in-memory ``mock://`` one, a bucket
    URI without a bucket. None (the default folder) passes.
    """
    if value is None:
        return None
    if not value.strip():
        raise OptionError(option, value, f"an empty path; give a folder or a URI, {_STORAGE_EXAMPLE} (the default)")
    if not is_uri(value):
        with _inspecting(option, value):
            problem = _folder_problem(Path(value), "Ray Tune's results")
        if problem:
            raise OptionError(option, value, problem)
        return value
    scheme = scheme_of(value)
    parts = urlsplit(value)
    if scheme == "mock":
        raise OptionError(option, value, "an in-memory test file system: each Ray process has its own, so the "
                          f"trials' results would be lost; {_STORAGE_EXAMPLE}")
    if scheme not in _STORAGE_SCHEMES:
        raise OptionError(option, value, f"{scheme}:// is not a file system Ray Tune can store to (pyarrow knows "
                          f"{', '.join(sorted(_STORAGE_SCHEMES))}); {_STORAGE_EXAMPLE}")
    if scheme in ("s3", "gs", "gcs", "abfs", "abfss") and not parts.netloc:
        raise OptionError(option, value, f"names no bucket or container; give {scheme}://BUCKET/FOLDER")
    if scheme in ("file", "local"):
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise OptionError(option, value, f"a {scheme}:// URI needs an absolute path, e.g. {scheme}:///data/r2sweep")
        with _inspecting(option, value):
            problem = _folder_problem(Path(parts.path), "Ray Tune's results")
        if problem:
            raise OptionError(option, value, problem)
    if scheme in _OFFLINE_SCHEMES:
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(value)
        except Exception as error:  # noqa: BLE001 - ArrowInvalid, a file system not built in: all unusable
            raise OptionError(option, value, f"Ray Tune cannot use it: {' '.join(str(error).split())}") from None
    return value


# -- sweep names --------------------------------------------------------------

#: What a storage URI reads as its query, fragment or an escape: not part of a folder name there.
_URI_SPECIAL = "?#%"


def _name_problem(value: str, *, uri_storage: bool = False) -> str | None:
    if value == "":
        return f"an empty name; give one, {_EXAMPLE_NAME} (default: the file's name)"
    if not value.strip():
        return f"only spaces; give a name, {_EXAMPLE_NAME}"
    if not value.isprintable():
        return f"contains a control character; use letters, digits, '-', '_' or '.', {_EXAMPLE_NAME}"
    if "/" in value or "\\" in value:
        return ("contains a folder separator: the name is a folder of --storage and an MLflow experiment; "
                f"use '-' or '_' instead, {_EXAMPLE_NAME}")
    if value in (".", ".."):
        return f"names the storage folder itself (or its parent), not a sweep's folder; {_EXAMPLE_NAME}"
    if ":" in value:
        return ("contains ':', which MLflow refuses in the name of the sweep's champion model (r2sweep-NAME); "
                f"use '-' or '_' instead, {_EXAMPLE_NAME}")
    size = len(value.encode())
    if size > _SWEEP_NAME_MAX:
        return (f"is {size} bytes long, more than {_SWEEP_NAME_MAX}: it ends up in file names such as "
                f"NAME-confirmed.yaml, which take {_NAME_MAX} bytes at most; shorten it")
    if uri_storage and any(c in value for c in _URI_SPECIAL):
        char = next(c for c in value if c in _URI_SPECIAL)
        return (f"contains {char!r}, which a storage URI (--storage s3://...) reads as a query, a fragment or an "
                f"escape, not as part of the sweep's folder; use '-' or '_' instead")
    return None


def sweep_name(value: str | None, option: str = "name", *, uri_storage: bool = False, in_file: bool = False) -> str | None:
    """The name of a new sweep: its folder in the storage, its MLflow experiment, ``r2sweep-NAME`` in the registry.

    Refused: an empty or blank name, control characters, ``/`` or ``\\``, ``.`` and
    ``..``, ``:`` (MLflow refuses it in a model name), more than 240 bytes (file
    names such as ``NAME-confirmed.yaml``), and with a storage URI ``?``, ``#``, ``%``.
    ``in_file``: the name comes from the search-space file (its ``name`` or file
    name); then the error is the file's ``name=... is not valid`` line.
    """
    if value is None:
        return None
    problem = _name_problem(value, uri_storage=uri_storage)
    if problem:
        if in_file:
            raise ConfigError("name", value, problem.replace(_EXAMPLE_NAME, "e.g. name: r2-linf"))
        raise OptionError(option, value, problem)
    return value


def sweep_to_read(value: str, option: str = "sweep name", *, register: bool = False) -> str:
    """The name of an existing sweep, for the readers (best, compare, report, confirm).

    Only names no sweep can have are refused (empty or blank): a sweep stored
    under a name that :func:`sweep_name` refuses today is still readable. With
    ``register`` (``best`` registers the champion model ``r2sweep-NAME``), also
    ``/`` and ``:``, which MLflow refuses in a model name.
    """
    if not value.strip():
        raise OptionError(option, value, "an empty name; give the name of a sweep in the tracking store")
    if register and ("/" in value or ":" in value):
        raise OptionError(option, value, "MLflow refuses '/' and ':' in the name of its champion model "
                          "(r2sweep-NAME); pass --no-register to only pick the best trial")
    return value


# -- Ray addresses ------------------------------------------------------------


def ray_address(value: str | None, option: str = "address", *, env: str | None = "RAY_ADDRESS") -> str | None:
    """A Ray cluster to join (else ``RAY_ADDRESS``, checked the same way); None: a local Ray.

    Refused: what :func:`parse_ray_address` refuses, and ``ray://`` when the Ray
    Client's dependency (grpcio, from ``ray[client]``) is not installed.
    """
    value, option = _from_env(value, option, env)
    if value is None:
        return None
    address = parse_ray_address(value, option)
    if address.kind == "client" and importlib.util.find_spec("grpc") is None:
        raise OptionError(option, value, "ray:// needs the Ray Client, which is not installed here "
                          "(pip install 'ray[client]'); or give the head's GCS address HOST:6379")
    return value


def start_from(value: str | None, top: int, resume: bool, option: str = "start_from",
               top_option: str = "start_top") -> str | None:
    """An earlier sweep to start from, and how many of its best configurations (at least 1);
    not with a resume, which goes on from its own trials."""
    if value is None:
        return None
    sweep_to_read(value, option)
    if resume:
        raise OptionError(option, value, "a resumed sweep goes on from its own trials; drop it, or start a new sweep")
    if isinstance(top, bool) or not isinstance(top, int):
        raise OptionError(top_option, top, "a whole number of configurations, e.g. 3")
    count(top, top_option, what="the earlier sweep's best configurations to try first")
    return value


# -- numbers and keys ---------------------------------------------------------


def count(value: int, option: str, *, what: str) -> int:
    """A count of at least 1 (``confirm --top``)."""
    if value < 1:
        raise OptionError(option, value, f"must be at least 1 ({what})")
    return value


def seeds(values: list[int], option: str = "seeds") -> list[int]:
    """Seeds of re-runs: one or more, distinct, each from 0 to 2**32-1 (NumPy's seed range)."""
    shown = list(values)
    if not values:
        raise OptionError(option, shown, "give one or more distinct seeds, e.g. --seeds 1 2 3")
    for seed in values:
        if not 0 <= seed <= _SEED_MAX:
            raise OptionError(option, shown, f"seed {seed} is outside 0 to {_SEED_MAX} (the seeds NumPy takes); "
                              "e.g. --seeds 1 2 3")
    repeated = sorted({seed for seed in values if values.count(seed) > 1})
    if repeated:
        raise OptionError(option, shown, f"seed {repeated[0]} is given twice (a repeat re-runs nothing new); "
                          "give distinct seeds, e.g. --seeds 1 2 3")
    return values


def key(value: str | None, option: str, *, example: str) -> str | None:
    """A parameter or metric name (``compare --by``, ``--metric``): not empty or blank."""
    if value is not None and not value.strip():
        raise OptionError(option, value, f"an empty name; give one, e.g. {example}")
    return value

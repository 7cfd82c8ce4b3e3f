"""The check of an MLflow tracking URI (:func:`tracking_uri`), made before any store is opened.

It only looks: no file is created and no store opened, and MLflow is not
imported at module level (SQLAlchemy only for a database URL), so that the
CLI refuses a bad URI in milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from r2sweep.core.option_errors import OptionError, _folder_problem, _from_env, _inspecting, _nearest_existing, _too_long

__all__ = ["tracking_uri"]

_DATABASES = ("postgresql", "mysql", "sqlite", "mssql")
#: Schemes MLflow resolves to a store of its own (besides http(s), the databases and the file store).
_MLFLOW_SCHEMES = {"databricks", "databricks-uc", "uc"}
_TRACKING_EXAMPLE = "sqlite:///mlflow.db (the default), http://HOST:5000 or postgresql://USER@HOST/DB"


def _plugin_schemes() -> set[str]:
    """Schemes of installed MLflow tracking-store plugins (entry points; nothing is imported)."""
    from importlib.metadata import entry_points

    return {entry.name for entry in entry_points(group="mlflow.tracking_store")}


def _file_store_allowed() -> bool:
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")


def _sqlite_problem(value: str) -> str | None:
    path_text = value.split(":///", 1)[1].split("?", 1)[0] if ":///" in value else ""
    if path_text in ("", ":memory:"):
        return ("names no file (an in-memory database is lost when the command ends); "
                "give a file, e.g. sqlite:///mlflow.db")
    path = Path(path_text)
    problem = _too_long(path)
    if problem:
        return problem
    if path.is_dir():
        return f"{path} is a folder; give a file in it, e.g. sqlite:///{path / 'mlflow.db'}"
    if path.exists():
        with open(path, "rb") as file:
            head = file.read(16)
        if head and head != b"SQLite format 3\x00":
            return f"{path} is not an SQLite database; give another file (MLflow creates it if missing)"
        return None
    folder = Path(os.path.abspath(path)).parent
    if not folder.exists():
        existing = _nearest_existing(folder)
        if not existing.is_dir():
            return f"{existing} is a file, so the database's folder {folder} cannot exist; give another path"
        return f"the folder {folder} does not exist (SQLite creates the file, not its folder); create it first"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder; give another path"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable by this user, so SQLite cannot create the file; give another path"
    return None


def _database_problem(value: str, scheme: str) -> str | None:
    """Why SQLAlchemy cannot open ``value``: a malformed URL, an unknown driver, a driver not installed."""
    from sqlalchemy.engine import make_url

    try:
        dialect = make_url(value).get_dialect()
        dialect.import_dbapi() if hasattr(dialect, "import_dbapi") else dialect.dbapi()
    except ImportError as error:
        example = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "mssql": "mssql+pymssql"}.get(scheme, scheme)
        return f"its database driver is not installed ({error}); install it, or name one that is, e.g. {example}://"
    except Exception as error:  # noqa: BLE001 - ArgumentError, NoSuchModuleError
        return f"not a database URL SQLAlchemy can open ({' '.join(str(error).split())}); e.g. {scheme}://USER@HOST/DB"
    return None


def tracking_uri(value: str | None, option: str = "tracking_uri", *, env: str | None = "MLFLOW_TRACKING_URI") -> str | None:
    """The MLflow tracking URI (else ``MLFLOW_TRACKING_URI``, checked the same way).

    Refused: an empty value; a scheme MLflow has no store for (``ftp://``); a
    file store (``file://`` or a plain path: MLflow 3 refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``); ``http(s)://`` without a host or with a
    bad port; an SQLite URI naming no file, a folder, a non-SQLite file, or a file
    in a folder that does not exist; a database URL whose driver is not installed.
    None with the variable unset (the default store) passes.
    """
    value, option = _from_env(value, option, env)
    if value is None:
        return None
    if not value.strip():
        raise OptionError(option, value, f"an empty URI; give {_TRACKING_EXAMPLE}")
    scheme = value if value in ("databricks", "databricks-uc") else urlsplit(value).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter: a path
        scheme = ""
    if scheme in ("", "file"):
        if _file_store_allowed():
            path = urlsplit(value).path if scheme else value
            with _inspecting(option, value):
                problem = _folder_problem(Path(path), "MLflow's file store")
            if problem:
                raise OptionError(option, value, problem)
            return value
        hint = f"sqlite:///{value}" if value.endswith(".db") and not scheme else _TRACKING_EXAMPLE
        raise OptionError(option, value, "a file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; "
                          f"give {hint}")
    if scheme in ("http", "https"):
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            raise OptionError(option, value, f"the port is not a number from 1 to 65535; e.g. {scheme}://HOST:5000") from None
        if not parts.hostname:
            raise OptionError(option, value, f"names no host; give {scheme}://HOST:PORT, e.g. {scheme}://127.0.0.1:5000")
        if port == 0:
            raise OptionError(option, value, f"port 0 is not a server's port; e.g. {scheme}://{parts.hostname}:5000")
        return value
    if scheme.split("+", 1)[0] in _DATABASES:
        if "://" not in value:
            raise OptionError(option, value, f"not a database URL; give {scheme}:///FILE.db" if scheme.startswith("sqlite")
                              else f"not a database URL; give {scheme}://USER@HOST/DB")
        with _inspecting(option, value):
            problem = _sqlite_problem(value) if scheme.startswith("sqlite") else None
        problem = problem or _database_problem(value, scheme.split("+", 1)[0])
        if problem:
            raise OptionError(option, value, problem)
        return value
    if scheme in _MLFLOW_SCHEMES or scheme in _plugin_schemes():
        return value
    if scheme == "postgres":
        hint = " (SQLAlchemy spells it postgresql://)"
    elif re.fullmatch(r"[\w.-]+:\d+", value):
        hint = f" (a server's URI starts with http://: http://{value})"
    else:
        hint = ""
    raise OptionError(option, value, f"{scheme!r} is not a scheme MLflow can track to{hint}; give {_TRACKING_EXAMPLE}")

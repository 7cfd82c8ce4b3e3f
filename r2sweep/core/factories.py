"""The user's own code: factory references, their import, their signature, and calling them by the contract.

A factory is named by a reference ``"module:function"`` (``"my_pkg.nets:build"``,
``"kws:make_model"``; a dotted path after the colon reaches a class's method).
That text is what a YAML file, an MLflow run and a sweep's record hold, so a
trial is always described by strings. From Python a callable can be given
instead: :func:`reference_of` names it and, when the name would not import back to
the same object (a lambda, a function defined in a script or a test), keeps it in
this process's table of *local callables*, which a sweep ships to its workers
with the trial (:func:`local_callables`, :func:`install_callables`).

The contract (docs/own_model.md): a factory is called with keyword arguments
only: the ones r2sweep provides (``num_classes``, ``in_channels``, ``input_size`` for
a model; ``seed`` for a dataset), each passed only when the signature names it,
and the section's other keys as its own options, checked against the signature so
a misspelled option is an error naming it, never a silently ignored ``**kwargs``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import sysconfig
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2sweep.core.errors import ConfigError, R2SweepError
from r2sweep.core.validate import reject_unknown

__all__ = [
    "Signature",
    "call_factory",
    "check_options",
    "factory_signature",
    "install_callables",
    "local_callables",
    "module_source",
    "installed_roots",
    "is_installed",
    "reference_of",
    "resolve_reference",
]

# Callables given from Python whose reference does not import back to them, by reference.
_LOCAL: dict[str, Callable[..., Any]] = {}


def _split(field: str, reference: str) -> tuple[str, str]:
    module, sep, attribute = reference.partition(":")
    if not sep or not module.strip() or not attribute.strip() or " " in reference:
        raise ConfigError(field, reference, "an import reference 'module:function' (e.g. 'my_pkg.nets:build')")
    return module, attribute


def reference_of(field: str, value: Any) -> str:
    """The reference text of a factory given as text or as a callable (kept as a local callable when needed).

    Raises:
        ConfigError: neither a reference nor a callable, or two different callables share one name.
    """
    if isinstance(value, str):
        _split(field, value)
        return value
    if not callable(value):
        raise ConfigError(field, value, "an import reference 'module:function' or, from Python, a callable")
    module = getattr(value, "__module__", None) or "__main__"
    qualname = getattr(value, "__qualname__", None) or type(value).__qualname__
    reference = f"{module}:{qualname}"
    try:
        if _import(reference) is value:
            return reference  # importable by name: workers import it like a YAML reference
    except Exception:  # noqa: BLE001 - any failure means "not importable by name": keep it local
        pass
    known = _LOCAL.get(reference)
    if known is not None and known is not value:
        raise ConfigError(field, reference, "one name per callable: another callable given from Python has this "
                          "module and name; give the functions distinct names (or define them in a module)")
    _LOCAL[reference] = value
    return reference


def _import(reference: str) -> Any:
    module_name, attribute = reference.split(":", 1)
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def resolve_reference(field: str, reference: str) -> Callable[..., Any]:
    """The callable a reference names: a local callable of this process, or the import of it.

    Raises:
        ConfigError: the module does not import (with the import error's own message),
            has no such attribute, or the attribute is not callable.
    """
    module_name, attribute = _split(field, reference)
    if reference in _LOCAL:
        return _LOCAL[reference]
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - the user's module may raise anything while importing
        raise ConfigError(field, reference, f"an importable module: importing {module_name!r} failed with "
                          f"{type(error).__name__}: {error}{_local_hint(reference)}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(field, reference, f"a name module {module_name!r} defines: it has no {part!r}"
                              f"{_local_hint(reference)}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(field, reference, f"a callable: {attribute!r} is a {type(target).__name__}")
    return target


def _local_hint(reference: str) -> str:
    if reference.startswith("__main__:") or "<locals>" in reference or "<lambda>" in reference:
        return ("; a function defined in a script, inside another function or as a lambda is known only to the "
                "Python process that gave it: define it at the top level of a module to use it from a file")
    return ""


def local_callables(references: Iterable[str]) -> dict[str, Callable[..., Any]]:
    """The local callables among ``references``: what a sweep ships to its workers."""
    return {ref: _LOCAL[ref] for ref in references if ref in _LOCAL}


def install_callables(table: Mapping[str, Callable[..., Any]]) -> None:
    """Make a driver's local callables resolvable in this (worker) process."""
    _LOCAL.update(table)


def installed_roots() -> list[Path]:
    """Folders of installed packages and the standard library: code every node has (or gets by pip)."""
    paths = sysconfig.get_paths()
    return [Path(paths[key]).resolve() for key in ("purelib", "platlib", "stdlib", "platstdlib") if key in paths]


def is_installed(path: Path) -> bool:
    """Whether ``path`` lies under :func:`installed_roots`."""
    return any(path == root or root in path.parents for root in installed_roots())


def module_source(reference: str) -> Path | None:
    """Where the code of a reference's top-level module lives: its package folder or its ``.py`` file.

    None for a local callable, a built-in module or a namespace without files.
    """
    if reference in _LOCAL:
        return None
    top = reference.split(":", 1)[0].split(".")[0]
    module = sys.modules.get(top) or importlib.import_module(top)
    file = getattr(module, "__file__", None)
    if file is None:
        return None
    path = Path(file).resolve()
    return path.parent if path.name == "__init__.py" else path


@dataclass(frozen=True)
class Signature:
    """What a factory declares: the keyword names it takes, which have no default, whether it takes ``**kwargs``."""

    names: tuple[str, ...]
    required: tuple[str, ...]
    defaults: Mapping[str, Any]
    var_keyword: bool

    def options(self, provided: Iterable[str]) -> dict[str, Any]:
        """Its own options (everything but what r2sweep provides), with their defaults."""
        skip = set(provided)
        return {name: self.defaults.get(name, inspect.Parameter.empty) for name in self.names if name not in skip}


def factory_signature(field: str, factory: Callable[..., Any]) -> Signature:
    """The keyword signature of ``factory`` (positional-only parameters cannot be given by name: refused)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: anything goes
        return Signature((), (), {}, True)
    names, required, defaults, var_keyword = [], [], {}, False
    for p in parameters:
        if p.kind is p.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.kind is p.POSITIONAL_ONLY:
            if p.default is p.empty:
                raise ConfigError(field, getattr(factory, "__qualname__", factory),
                                  f"a factory whose parameters can be given by name ({p.name!r} is positional-only)")
        else:
            names.append(p.name)
            if p.default is p.empty:
                required.append(p.name)
            else:
                defaults[p.name] = p.default
    return Signature(tuple(names), tuple(required), defaults, var_keyword)


def check_options(section: str, reference: str, signature: Signature, provided: Iterable[str],
                  options: Mapping[str, Any], keys: Iterable[str] = ()) -> None:
    """Refuse an option the factory does not take, and a required one that is missing.

    Args:
        keys: the section's own keys (``name``, ``root``, ...), listed first among the known fields.

    Raises:
        ConfigError: naming ``<section>.<option>``.
    """
    provided = tuple(provided)
    own = signature.options(provided)
    if not signature.var_keyword:
        known = [*keys, *own]
        reject_unknown(options, list(dict.fromkeys(known)), lambda key: f"{section}.{key}")
    for name in signature.required:
        if name not in provided and name not in options:
            raise ConfigError(f"{section}.{name}", None, f"a value: {reference} requires it (it has no default)")


def call_factory(field: str, reference: str, factory: Callable[..., Any], signature: Signature,
                 provided: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
    """Call ``factory`` by the contract: the provided values its signature names, then its options.

    Raises:
        ConfigError: the factory raised (its error's own message), naming ``field``
            (``model.factory``, or ``model.name`` for a registered one).
    """
    given = {k: v for k, v in provided.items() if k in signature.names}
    try:
        return factory(**given, **options)
    except R2SweepError:
        raise  # r2sweep's own errors (a dataset's missing files) already say what to fix
    except Exception as error:  # noqa: BLE001 - the user's code may raise anything; name it and the field
        raise ConfigError(field, reference,
                          f"a factory that builds: calling it with {sorted({**given, **options})} raised "
                          f"{type(error).__name__}: {error}") from None

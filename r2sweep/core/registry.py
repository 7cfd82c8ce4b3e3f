"""A tiny name -> object registry, open to installed plugins.

Registered names are the vocabulary of the YAML files (``model.name: resnet18``,
``r2.kind: margin``), so an unknown name is a :class:`~r2sweep.core.errors.ConfigError`
that lists every name that would have worked.

A registry may name an entry-point group (``r2sweep.models``, ``r2sweep.datasets``):
every installed distribution's entry points in it join the registry the first time
a name is looked up, so ``pip install my-nets`` is enough for ``model: {name: my_net}``.
A plugin that fails to import does not break the others; asking for it is the
error, with the import error's own message.
"""

from __future__ import annotations

from importlib import metadata
from typing import Callable, Generic, Iterator, TypeVar

from r2sweep.core.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries (classes or factory functions).

    Args:
        field: the config field whose values are these names, e.g. ``"model.name"``;
            it is what error messages name.
        entry_points: the entry-point group whose plugins join this registry (None: none).
    """

    def __init__(self, field: str, entry_points: str | None = None) -> None:
        self.field = field
        self.entry_points = entry_points
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}  # plugin name -> "plugin <distribution> (<module:attr>)"
        self._broken: dict[str, str] = {}  # plugin name -> why it is not usable
        self._plugins_loaded = entry_points is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an entry under ``name``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.field}: {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for plugins and tests that register temporary entries)."""
        self._entries.pop(name, None)
        self._origins.pop(name, None)

    def load_plugins(self, *, again: bool = False) -> None:
        """Add the installed plugins of this registry's entry-point group (once; ``again``: look anew)."""
        if self.entry_points is None or (self._plugins_loaded and not again):
            return
        self._plugins_loaded = True
        for point in metadata.entry_points(group=self.entry_points):
            source = f"plugin {point.dist.name if point.dist else '?'} ({point.value})"
            if point.name in self._entries and point.name not in self._origins:
                self._broken[point.name] = f"{source} is shadowed by the built-in {point.name!r}; rename it"
                continue
            try:
                entry = point.load()
            except Exception as error:  # noqa: BLE001 - a plugin may raise anything while importing
                self._broken[point.name] = f"{source} failed to import: {type(error).__name__}: {error}"
                continue
            self._entries[point.name] = entry
            self._origins[point.name] = source
            self._broken.pop(point.name, None)

    def get(self, name: str) -> T:
        self.load_plugins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            if isinstance(name, str) and name in self._broken:
                raise ConfigError(self.field, name, f"a usable entry: {self._broken[name]}") from None
            raise ConfigError(self.field, name, f"choose one of {self.names()}") from None

    def own(self, name: object) -> T | None:
        """The entry of ``name`` when it is the package's own or was registered from Python in this
        process; None otherwise (a plugin's, or unknown). Loads no plugin: what parsing a config may ask."""
        if not isinstance(name, str) or name in self._origins:
            return None
        return self._entries.get(name)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def origin(self, name: str) -> str | None:
        """Where a plugin entry comes from; None for a built-in one."""
        self.load_plugins()
        return self._origins.get(name)

    def problems(self) -> dict[str, str]:
        """Plugins of the group that could not join, each with why."""
        self.load_plugins()
        return dict(self._broken)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

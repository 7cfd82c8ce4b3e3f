"""A tiny name -> object registry.

Registered names are the vocabulary of the YAML files (``model.name: resnet18``,
``r2.kind: margin``), so an unknown name is a :class:`~r2sweep.core.errors.ConfigError`
that lists every name that would have worked.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from r2sweep.core.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries (classes or factory functions).

    Args:
        field: the config field whose values are these names, e.g. ``"model.name"``;
            it is what error messages name.
    """

    def __init__(self, field: str) -> None:
        self.field = field
        self._entries: dict[str, T] = {}

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

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(self.field, name, f"choose one of {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

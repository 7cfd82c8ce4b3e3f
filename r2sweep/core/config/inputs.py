"""The ``data:`` and ``model:`` sections: what a trial trains, the package's own or the user's.

Either section names a registered entry (``name: resnet18``; the package's own,
or an installed plugin's) or the user's code (``factory: "my_pkg.nets:build"``, or
from Python the callable itself); every other key is that factory's own option.
``model.init_from`` names a checkpoint to start from; its content hash is part of
the config, so two checkpoints never look like one experiment, and a checkpoint
that changes after a sweep started is refused instead of silently used.

Two steps, kept apart on purpose. Loading a section (``from_mapping``) is pure:
it checks the text and, for the package's own models and datasets, their options
against the package's own signatures; it imports no user code or plugin and
reads no file, so a stored record of a sweep can be read on any machine.
:meth:`resolve` is the step that looks at this machine: it imports the factory
or plugin, checks the options against its signature and fills in its defaults,
and hashes ``init_from``. It runs only where something will execute
(:mod:`r2sweep.core.environment`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from r2sweep.core.config.sections import from_dict
from r2sweep.core.data import DATASETS
from r2sweep.core.data.registry import PROVIDED as DATA_PROVIDED
from r2sweep.core.errors import ConfigError
from r2sweep.core.factories import Signature, check_options, factory_signature, reference_of, resolve_reference
from r2sweep.core.locations import is_uri
from r2sweep.core.models import MODELS
from r2sweep.core.models.registry import PROVIDED as MODEL_PROVIDED
from r2sweep.core.models.registry import STEMS
from r2sweep.core.validate import check

__all__ = ["DataConfig", "ModelConfig", "with_references"]


def with_references(sections: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of trial sections with any callable ``model.factory``/``data.factory`` replaced by its reference
    text: what a YAML dump, an MLflow run and a Ray worker can carry."""
    out = dict(sections)
    for section in ("model", "data"):
        body = out.get(section)
        if isinstance(body, Mapping) and callable(body.get("factory")):
            out[section] = {**body, "factory": reference_of(f"{section}.factory", body["factory"])}
    return out


def _source(section: str, name: str | None, factory: str | None, registry: Any, default: str) -> tuple[str, str, Any]:
    """(the field errors name, the reference shown, the callable when it is the package's own, else None).

    Pure: a factory or a name the package does not define is looked up only by :func:`_entry`."""
    if name is not None and factory is not None:
        raise ConfigError(f"{section}.factory", factory, f"either {section}.name (a registered {section}) or "
                          f"{section}.factory (your own code), not both: drop {section}.name")
    if factory is not None:
        return f"{section}.factory", factory, None
    name = default if name is None else name
    check(isinstance(name, str) and name.strip() != "", f"{section}.name", name,
          f"a registered {section}'s name (r2sweep list {section}), or {section}.factory: 'module:function'")
    return f"{section}.name", name, registry.own(name)


def _entry(section: str, name: str | None, factory: str | None, registry: Any, default: str) -> tuple[str, str, Any]:
    """(the field errors name, the reference shown, the callable) of a section's name or factory: imports it."""
    where, reference, builder = _source(section, name, factory, registry, default)
    if builder is not None:
        return where, reference, builder
    if factory is not None:
        return where, factory, resolve_reference(where, factory)
    if isinstance(name, str) and name in registry.problems():
        registry.get(name)  # a plugin that failed to import: its own error, with the import's message
    check(isinstance(name, str) and name in registry, f"{section}.name", name,
          f"one of {registry.names()} (r2sweep list {section}), or {section}.factory: 'module:function'")
    return f"{section}.name", name, registry.get(name)


def _plain(value: Any) -> bool:
    """Whether a value is what a YAML file can hold (a default like a tuple or a class is not)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())


def _with_defaults(signature: Signature, provided: tuple[str, ...], options: Mapping[str, Any]) -> dict[str, Any]:
    """The options in signature order with every default filled in, so one model reads as one mapping
    (``{name: resnet18}`` and ``{name: resnet18, width: 1.0}`` are the same experiment). A default a
    YAML file cannot hold is left to the factory."""
    out: dict[str, Any] = {}
    for key, default in signature.options(provided).items():
        if key in options:
            value = options[key]
            # An int where the default is a float is that float (width: 1 is width: 1.0).
            out[key] = float(value) if isinstance(default, float) and type(value) is int else value
        elif default is not inspect.Parameter.empty and _plain(default):
            out[key] = default
    out.update({k: v for k, v in options.items() if k not in out})  # a **kwargs factory's extras
    return out


@dataclass
class _DataKeys:  # the typed keys of data:, checked by from_dict before DataConfig checks the rest
    name: Optional[str] = None
    factory: Optional[str] = None
    root: Optional[str] = None
    val_fraction: Optional[float] = None


@dataclass
class _ModelKeys:  # the typed keys of model:, checked by from_dict before ModelConfig checks the rest
    name: Optional[str] = None
    factory: Optional[str] = None
    init_from: Optional[str] = None
    init_from_strict: bool = True
    init_from_sha256: Optional[str] = None


class _FactorySection:
    """What ``data:`` and ``model:`` share: a name or a factory, the section's own keys, the rest options."""

    section: ClassVar[str]
    default_name: ClassVar[str]
    own_keys: ClassVar[tuple[str, ...]]
    keys_class: ClassVar[type]  # the typed own keys, checked by from_dict before the section checks the rest
    example: ClassVar[str]
    name: str | None
    factory: str | None

    options: dict[str, Any]
    #: Whether the options were checked against the builder's signature (at load for the package's
    #: own entries, by :meth:`resolve` for the user's code and plugins).
    resolved: bool

    @property
    def reference(self) -> str:
        """The name or ``module:function`` this section builds with."""
        return self.factory or self.name or self.default_name

    def _parse(self, registry: Any, provided: tuple[str, ...]) -> None:
        """The pure half: the reference's form, and a package entry's options."""
        section = self.section
        if self.factory is not None:
            self.factory = reference_of(f"{section}.factory", self.factory)
        where, reference, builder = _source(section, self.name, self.factory, registry, self.default_name)
        if self.factory is None:
            self.name = reference
        self.resolved = False
        if builder is not None:
            self._check_options(where, reference, builder, provided)

    def _check_options(self, where: str, reference: str, builder: Any, provided: tuple[str, ...]) -> None:
        signature = factory_signature(where, builder)
        keys = [where.split(".")[1], *self.section_keys(signature)]
        check_options(self.section, reference, signature, provided, self.options, keys)
        self.options = _with_defaults(signature, provided, self.options)
        self.check_signature_keys(reference, signature)
        self.resolved = True

    def _resolve(self, registry: Any, provided: tuple[str, ...]) -> None:
        if not self.resolved:
            where, reference, builder = _entry(self.section, self.name, self.factory, registry, self.default_name)
            self._check_options(where, reference, builder, provided)

    def section_keys(self, signature: Signature) -> list[str]:
        """The section's own keys an options error lists beside the builder's options."""
        raise NotImplementedError

    def check_signature_keys(self, reference: str, signature: Signature) -> None:
        """Checks of the section's own keys that need the builder's signature."""

    @classmethod
    def from_mapping(cls, data: Any) -> Any:
        if data is None:
            data = {}
        check(isinstance(data, Mapping), cls.section, data, f"a mapping such as {cls.example}")
        data = with_references({cls.section: data})[cls.section]
        own = {k: v for k, v in data.items() if k in cls.own_keys}
        options = {k: v for k, v in data.items() if k not in own}
        return cls(**vars(from_dict(cls.keys_class, own, cls.section)), options=options)


@dataclass
class DataConfig(_FactorySection):
    """``data:``: a registered dataset (``name``) or the user's ``factory``; other keys are its options."""

    section: ClassVar[str] = "data"
    default_name: ClassVar[str] = "digits"
    own_keys: ClassVar[tuple[str, ...]] = ("name", "factory", "root", "val_fraction")
    example: ClassVar[str] = "{name: digits} or {factory: 'my_pkg.data:load'}"
    keys_class: ClassVar[type] = _DataKeys

    name: Optional[str] = None
    factory: Optional[str] = None
    root: Optional[str] = None
    val_fraction: Optional[float] = None
    options: dict[str, Any] = field(default_factory=dict)
    resolved: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.val_fraction is not None:
            check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "a number strictly between 0 and 1, or null")
        self._parse(DATASETS, DATA_PROVIDED)

    def resolve(self) -> None:
        """Import the dataset's factory (or plugin), check its options and fill in its defaults."""
        self._resolve(DATASETS, DATA_PROVIDED)

    def section_keys(self, signature: Signature) -> list[str]:
        return [key for key in ("root", "val_fraction") if key in signature.names]

    def check_signature_keys(self, reference: str, signature: Signature) -> None:
        for key in ("root", "val_fraction"):
            if getattr(self, key) is not None and key not in signature.names:
                raise ConfigError(f"data.{key}", getattr(self, key), f"null: {reference} takes no {key}")

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {"factory": self.factory} if self.factory else {"name": self.name}
        if self.factory is None or self.root is not None:
            out["root"] = self.root
        if self.factory is None or self.val_fraction is not None:
            out["val_fraction"] = self.val_fraction
        out.update(self.options)
        return out


@dataclass
class ModelConfig(_FactorySection):
    """``model:``: a registered architecture (``name``) or the user's ``factory``, its options, and
    optionally a checkpoint to start from (``init_from``)."""

    section: ClassVar[str] = "model"
    default_name: ClassVar[str] = "small_cnn"
    example: ClassVar[str] = "{name: resnet18} or {factory: 'my_pkg.nets:build'}"
    keys_class: ClassVar[type] = _ModelKeys
    own_keys: ClassVar[tuple[str, ...]] = ("name", "factory", "init_from", "init_from_strict", "init_from_sha256")

    name: Optional[str] = None
    factory: Optional[str] = None
    init_from: Optional[str] = None
    init_from_strict: bool = True
    # Filled in from the file when loaded; a value given is checked against the file (a pin).
    init_from_sha256: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    resolved: bool = field(default=False, repr=False, compare=False)
    # The init_from this object has read and hashed: a trial resolves its config at several steps
    # (the driver's check, the trial, the cache key), and a large checkpoint is hashed once.
    hashed: Optional[str] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_init_from()
        self._parse(MODELS, MODEL_PROVIDED)
        if self.resolved and self.factory is None:  # the package's own: width and stem
            width, stem = self.options.get("width"), self.options.get("stem")
            check(isinstance(width, float) and width > 0, "model.width", width, "a number > 0")
            check(stem in STEMS, "model.stem", stem, f"one of {list(STEMS)}")

    def section_keys(self, signature: Signature) -> list[str]:
        return list(self.own_keys[2:])

    def resolve(self) -> None:
        """Import the model's factory (or plugin), check its options and fill in its defaults; read and
        hash ``init_from`` (a hash given is a pin: a file that changed since is refused)."""
        self._resolve(MODELS, MODEL_PROVIDED)
        if self.init_from is None or self.hashed == self.init_from:
            return
        from r2sweep.core.warm_start import file_sha256  # torch: only for a config that starts from weights

        check(os.path.isfile(self.init_from), "model.init_from", self.init_from, "an existing checkpoint file (a state "
              "dict, a torchvision .pth or an r2sweep pretrained.pt); the driver reads it to check and hash it")
        path = self.init_from
        digest = file_sha256(path)
        if self.init_from_sha256 is not None and self.init_from_sha256 != digest:
            raise ConfigError("model.init_from", path, f"the checkpoint this config was made with (sha256 "
                              f"{self.init_from_sha256[:12]}...); the file now holds {digest[:12]}...: it changed, so "
                              "results would mix two starting points; restore it, or start a new sweep")
        self.init_from_sha256 = digest
        self.hashed = path

    def _check_init_from(self) -> None:
        check(isinstance(self.init_from_strict, bool), "model.init_from_strict", self.init_from_strict, "true or false")
        if self.init_from is None:
            check(self.init_from_sha256 is None, "model.init_from_sha256", self.init_from_sha256,
                  "null without model.init_from (it pins that checkpoint's content)")
            return
        path = self.init_from
        check(isinstance(path, str) and path.strip() != "" and not is_uri(path), "model.init_from", path,
              "a checkpoint file's path (on a file system every node mounts, for a cluster)")
        # Absolute now: trials run in other folders, and on other nodes. The file itself is read by resolve().
        self.init_from = os.path.abspath(os.path.expanduser(path))

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {"factory": self.factory} if self.factory else {"name": self.name}
        out.update(self.options)
        if self.init_from is not None:
            out.update(init_from=self.init_from, init_from_strict=self.init_from_strict,
                       init_from_sha256=self.init_from_sha256)
        return out

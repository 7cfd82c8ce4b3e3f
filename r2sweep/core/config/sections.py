"""Config sections as data-only dataclasses, loaded strictly from plain dicts (YAML).

Strict means: an unknown key is an error naming it (a misspelled key must never
fall back to a default silently), a wrong type is an error naming the field and
the type wanted, and every range is checked before anything runs. Each section
validates itself in ``__post_init__``, so a config built in Python is checked the
same way as one read from a file.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar, Union

from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.losses import R2_LOSSES, R2Loss, make_r2_loss
from r2sweep.core.precision import PRECISIONS
from r2sweep.core.validate import check, is_number, reject_unknown

__all__ = ["TrainConfig", "R2Config", "from_dict", "to_dict"]

C = TypeVar("C")


def _coerce(field: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(field, value, option)
            except ConfigError as error:
                errors.append(error.allowed)
        raise ConfigError(field, value, " or ".join(errors))
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        check(isinstance(value, list), field, value, "a list")
        return [_coerce(f"{field}[{i}]", item, item_type) for i, item in enumerate(value)]
    if annotation is bool:
        check(isinstance(value, bool), field, value, "true or false")
    elif annotation is int:
        check(isinstance(value, int) and not isinstance(value, bool), field, value, "an integer")
    elif annotation is float:
        check(is_number(value), field, value, "a finite number")
        return float(value)
    elif annotation is str:
        check(isinstance(value, str), field, value, "a string")
    elif dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, field)
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving string annotations compiles each one: once per class, not once per load
    # (a sweep's validation loads the trial config once per value a search can take).
    return typing.get_type_hints(cls)


def from_dict(cls: type[C], data: Mapping[str, Any] | None, path: str | None = None) -> C:
    """Build the dataclass ``cls`` from ``data``, strictly.

    Args:
        path: the dotted prefix that error messages put before field names
            (defaults to the class's ``section``).
    """
    prefix = path if path is not None else getattr(cls, "section", "")
    dotted = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "config", data, "a mapping of field: value")
    hints = _type_hints(cls)
    known = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    reject_unknown(data, known, dotted)
    for key, value in data.items():
        kwargs[key] = _coerce(dotted(key), value, hints[key])
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config (what YAML files hold)."""
    return dataclasses.asdict(config)


@dataclass
class TrainConfig:
    """Pre-training (``train:`` section); ``precision`` is the forward's autocast dtype, weights stay float32."""

    section: ClassVar[str] = "train"
    optimizers: ClassVar[tuple[str, ...]] = ("sgd", "adam")
    schedules: ClassVar[tuple[str, ...]] = ("cosine", "step", "constant")

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: int = 30
    step_gamma: float = 0.1
    num_workers: int = 0
    device: str = "auto"
    # Last, so the field order (and the "known fields" lists in messages) only grows at the end.
    precision: str = "fp32"
    # Data-parallel ranks of the pre-training (r2sweep.core.distributed); batch_size is the global batch.
    workers: int = 1

    def __post_init__(self) -> None:
        s = self.section
        check(self.epochs >= 1, f"{s}.epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, f"{s}.batch_size", self.batch_size, "an integer >= 1")
        check(self.optimizer in self.optimizers, f"{s}.optimizer", self.optimizer, f"one of {list(self.optimizers)}")
        check(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")
        check(0 <= self.momentum < 1, f"{s}.momentum", self.momentum, "a number in [0, 1)")
        check(self.weight_decay >= 0, f"{s}.weight_decay", self.weight_decay, "a number >= 0")
        check(self.schedule in self.schedules, f"{s}.schedule", self.schedule, f"one of {list(self.schedules)}")
        check(self.step_epochs >= 1, f"{s}.step_epochs", self.step_epochs, "an integer >= 1")
        check(0 < self.step_gamma <= 1, f"{s}.step_gamma", self.step_gamma, "a number in (0, 1]")
        check(self.num_workers >= 0, f"{s}.num_workers", self.num_workers, "an integer >= 0")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"{s}.device",
            self.device,
            "'auto' (a GPU when one is present), 'cpu', 'cuda' or 'cuda:N'",
        )
        # Whether the device can run it (fp16 needs CUDA) is checked once the
        # device is resolved: "auto" means different machines in one sweep.
        check(self.precision in PRECISIONS, f"{s}.precision", self.precision, f"one of {list(PRECISIONS)}")
        check(isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1,
              f"{s}.workers", self.workers, "an integer >= 1 (data-parallel ranks of the pre-training)")
        check(self.batch_size % self.workers == 0, f"{s}.batch_size", self.batch_size,
              f"a multiple of {s}.workers ({self.workers}): it is the global batch, split evenly over the ranks")

    def unused_fields(self) -> dict[str, str]:
        """Fields the chosen optimizer and schedule never read (``train.step_gamma`` under cosine),
        each with the setting that makes it unused."""
        unused = {} if self.schedule == "step" else dict.fromkeys(("step_epochs", "step_gamma"), f"train.schedule={self.schedule}")
        if self.optimizer == "adam":
            unused["momentum"] = "train.optimizer=adam"
        return {f"{self.section}.{name}": why for name, why in unused.items()}


@dataclass
class R2Config:
    """R2-Loss settings (``r2:`` section); options a kind does not use are ignored by it."""

    section: ClassVar[str] = "r2"

    kind: str = "none"
    strength: float = 0.0
    reduction: str = "sum"
    granularity: str = "tensor"
    skip_first_last: bool = False
    start_epoch: int = 0
    margin_init: Union[str, float] = "max"
    alpha_init: float = 5.0
    eta: float = 1.0

    def __post_init__(self) -> None:
        # Building the loss on a one-layer model runs every check the loss itself
        # makes, so the config and the library can never disagree on what is valid.
        self.build(nn.Linear(1, 1))

    def unused_fields(self) -> dict[str, str]:
        """Fields this kind never reads (``r2.margin_init`` under L-inf; all but the kind without R2),
        each with the setting that makes it unused."""
        used = {"kind"} if self.kind == "none" else {"kind", "strength", *self.options()}
        return {f"{self.section}.{f.name}": f"r2.kind={self.kind}" for f in fields(self) if f.name not in used}

    def options(self) -> dict[str, Any]:
        """The keyword options ``make_r2_loss`` takes for this kind."""
        cls = R2_LOSSES.get(self.kind)
        names = cls.common_options + cls.own_options
        return {name: getattr(self, name) for name in names}

    def build(self, model: nn.Module) -> R2Loss:
        return make_r2_loss(model, self.kind, self.strength, **self.options())

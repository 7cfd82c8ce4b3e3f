"""Starting a trial from a checkpoint (``model.init_from``): read it safely, check it, load it, hash it.

Three kinds of file are read, all with ``torch.load(weights_only=True)`` so a
checkpoint can never run code:

* a plain state dict (``torch.save(model.state_dict(), path)``), a torchvision
  ``.pth`` among them (r2sweep's ResNet-18 and MobileNet-V2 keep torchvision's names);
* a ``pretrained.pt`` that r2sweep wrote (``{"model": state_dict, "layers": ..., ...}``, :mod:`r2sweep.core.pretrained_file`);
* a training checkpoint holding its weights under ``"state_dict"`` (Lightning and others).

A ``module.`` prefix on every key (``nn.DataParallel``) is dropped. Loading is
strict by default: any missing, unexpected or wrong-shaped key is one error listing
the first of each. Non-strict loading takes every tensor whose name and shape match
and reports the rest (a new classifier head for another number of classes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from r2sweep.core.errors import ConfigError

__all__ = ["LoadReport", "file_sha256", "read_weights", "load_weights"]

FIELD = "model.init_from"
_SHOWN = 3  # keys named per kind of mismatch: enough to recognise the problem, short enough for one line
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes; remembered per (path, size, modification time), so re-reading is free."""
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())


def read_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict held by a checkpoint file (see the module docstring for the kinds read).

    Raises:
        ConfigError: (``model.init_from``) not a file torch can read safely, or no weights in it.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file it cannot read
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # weights_only refuses any pickled object that is not a tensor or a primitive: a whole
        # model saved with torch.save(model) reads as "Unsupported global: ...".
        pickled = next((line for line in lines if "Unsupported global" in line), None)
        if pickled is not None:
            raise ConfigError(FIELD, os.fspath(path), f"saved weights, not a pickled model: save model.state_dict() "
                              f"({pickled[:160]})") from None
        raise ConfigError(FIELD, os.fspath(path), f"a checkpoint torch.load reads ({type(error).__name__}: "
                          f"{lines[-1][:160]})") from None
    for state in (loaded, *(loaded.get(key) for key in ("model", "state_dict") if isinstance(loaded, Mapping))):
        if _is_state_dict(state):
            state = dict(state)
            if all(k.startswith("module.") for k in state):
                state = {k.removeprefix("module."): v for k, v in state.items()}
            return state
    kind = f"a mapping with keys {sorted(map(str, loaded))[:6]}" if isinstance(loaded, Mapping) else f"a {type(loaded).__name__}"
    raise ConfigError(FIELD, os.fspath(path), f"a checkpoint holding a state dict (name -> tensor); this file holds {kind}")


@dataclass(frozen=True)
class LoadReport:
    """What a load took and left: tensor names, by kind of mismatch."""

    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]  # "name: checkpoint (a, b), model (c, d)"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One line: the first keys of each kind of mismatch."""
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.mismatched)):
            if keys:
                more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:_SHOWN])}{more})")
        return "; ".join(parts)


def _compare(model: nn.Module, state: Mapping[str, Tensor]) -> LoadReport:
    own = model.state_dict()
    mismatched = tuple(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
                       for k, v in own.items() if k in state and state[k].shape != v.shape)
    return LoadReport(
        loaded=sum(1 for k, v in own.items() if k in state and state[k].shape == v.shape),
        missing=tuple(k for k in own if k not in state),
        unexpected=tuple(k for k in state if k not in own),
        mismatched=mismatched,
    )


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> LoadReport:
    """Load the checkpoint at ``path`` into ``model`` (in place) and say what was loaded.

    Raises:
        ConfigError: (``model.init_from``) unreadable, strict and not an exact match, or
            (either way) no tensor of the model found in it: the wrong architecture.
    """
    state = read_weights(path)
    report = _compare(model, state)
    name = Path(path).name
    if report.loaded == 0:
        raise ConfigError(FIELD, os.fspath(path), f"a checkpoint of this model: none of its tensors fit ({report.describe()})")
    if strict and not report.complete:
        raise ConfigError(FIELD, os.fspath(path), f"a checkpoint of this architecture: {name} has {report.describe()}; "
                          "for a new classifier head set model.init_from_strict: false")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    with torch.no_grad():
        model.load_state_dict(fitting, strict=False)
    return report

"""Full-state checkpoints written atomically and loaded without unpickling code.

A checkpoint is a plain dict of tensors and Python primitives, so
``torch.load(weights_only=True)`` can read it: loading a checkpoint from a shared
results folder must never execute code from it. Writes go to a temporary file in
the same folder and are renamed over the target, so a crash mid-write leaves the
previous checkpoint intact instead of a truncated one.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["state_copy", "load_state", "save_atomic", "save_bytes_atomic", "write_text_atomic", "load_checkpoint", "capture_rng_state", "restore_rng_state"]


def state_copy(model: torch.nn.Module, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state (on ``device``, else where it is) that ``load_state_dict`` takes back.

    It keeps the state's metadata, which a module may read when loading: torchvision's
    MNASNet refuses a state without its version. A plain ``{k: v.clone()}`` drops it.
    """
    state = model.state_dict()
    copied = OrderedDict((key, value.detach().to(device, copy=True)) for key, value in state.items())
    copied._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return copied


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, strict, with the model's own metadata where ``state`` has none
    (a file written before :func:`state_copy` kept it, or a plain dict): the tensors decide, and a
    module that reads its version while loading finds the one it was built with."""
    if getattr(state, "_metadata", None) is None:
        state = OrderedDict(state)
        state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state)


def save_atomic(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` so that readers see the old file or the new one, never half."""
    return _write_atomic(path, lambda handle: torch.save(state, handle))


def save_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, like :func:`save_atomic`."""
    return _write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`save_atomic`."""
    return _write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def _write_atomic(path: str | os.PathLike[str], write: Any) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

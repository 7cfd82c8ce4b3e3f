"""What a trial leaves of its pre-trained model: tensors and plain data, never code.

``pretrained.pt`` holds the state dict, the names of the layers R2 restricts (the
ones the weight figures show), the input shape and the class count: everything a
reader needs, read back with ``torch.load(weights_only=True)``. It names no
factory: a report draws its figures from these tensors, and whoever wants the
model back builds it from a config of their own (:func:`model_from_pretrained`).

``pretrained.pt2`` is the same model as a ``torch.export`` archive (a graph of
torch operators and its weights), made in the trial, where the model's code runs
anyway: it is what the sweep registers as its champion, byte for byte, so the
registration runs no model code either. A model ``torch.export`` cannot trace
has none, and the trial's notes say why.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r2sweep.core.checkpoint import load_checkpoint, save_atomic
from r2sweep.core.losses import regularized_layers

__all__ = ["PRETRAINED", "MODEL_ARCHIVE", "PretrainedFile", "save_pretrained", "load_pretrained", "export_archive"]

#: The pre-trained weights (a state dict and plain data), in a trial's folder and its MLflow run.
PRETRAINED = "pretrained.pt"
#: The pre-trained model as a torch.export archive, in a trial's folder and its MLflow run.
MODEL_ARCHIVE = "pretrained.pt2"


@dataclass
class PretrainedFile:
    """A ``pretrained.pt`` read back: tensors and plain data."""

    state: dict[str, torch.Tensor]
    layer_names: list[str]  # the Conv/Linear layers R2 restricts, in module order
    input_shape: list[int]  # one sample's shape (channels, height, width)
    num_classes: int

    @property
    def layers(self) -> dict[str, torch.Tensor]:
        """Each restricted layer's weight, by layer name: what the weight figures draw."""
        return {name: self.state[f"{name}.weight"] for name in self.layer_names if f"{name}.weight" in self.state}


def save_pretrained(model: nn.Module, input_shape: list[int], num_classes: int, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s ``pretrained.pt`` atomically."""
    save_atomic({"model": model.state_dict(), "layers": [name for name, _ in regularized_layers(model)],
                 "input_shape": [int(n) for n in input_shape], "num_classes": int(num_classes)}, path)


def load_pretrained(path: str | os.PathLike[str]) -> PretrainedFile:
    """A ``pretrained.pt`` as tensors and data (``weights_only``: nothing in it is called).

    Raises:
        ValueError: the file is not an r2sweep ``pretrained.pt`` of this version (it lacks one of its keys).
    """
    state: dict[str, Any] = load_checkpoint(path)
    missing = [key for key in ("model", "layers", "input_shape", "num_classes") if key not in state]
    if missing:
        raise ValueError(f"{Path(path).name} is not a pretrained.pt of this r2sweep (an older one's, or not "
                         f"r2sweep's): it has no {', '.join(missing)}")
    return PretrainedFile(dict(state["model"]), [str(n) for n in state["layers"]], [int(n) for n in state["input_shape"]],
                          int(state["num_classes"]))


def export_archive(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> str | None:
    """Write ``model`` (eval mode, on ``example``'s device) as a torch.export archive with a dynamic
    batch dimension; None, or why it could not be exported (the file is then not written)."""
    was_training = model.training
    model.eval()
    try:
        # A refusal prints the partial graph to stderr (tens of lines per trial); the note says why instead.
        with contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        target = Path(path)
        # torch.export warns (once per trial, into every worker's log) about a name not ending in .pt2.
        partial = target.with_name(f".partial.{target.name}")
        torch.export.save(program, partial)
        os.replace(partial, target)
    except Exception as error:  # noqa: BLE001 - torch.export refuses many models, each in its own way
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {first[:200]}"
    finally:
        model.train(was_training)
    return None


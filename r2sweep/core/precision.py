"""Mixed precision and memory format for the training loops (pre-training and fine-tuning).

One :class:`Precision` per loop holds what the loop needs to keep a GPU busy
without changing what it computes:

* ``autocast()``: the model's forward under ``torch.autocast`` for ``bf16`` /
  ``fp16``. Only the forward: parameters, gradients and the optimizer state stay
  float32 (autocast casts copies per op), so a low-precision run is the same
  optimisation on a noisier forward, not a half-precision optimizer.
* ``backward_step(loss, optimizer)``: ``fp16`` has too narrow an exponent for
  small gradients, so it goes through a ``GradScaler`` (a step whose gradients
  overflowed is skipped by the scaler and the scale lowered; only a non-finite
  *loss* means the trial diverged). ``bf16`` has float32's exponent and needs none.
* ``prepare(model)`` / ``batch(x, y)``: channels-last on CUDA for models with
  ``Conv2d`` layers (cuDNN's NHWC kernels, tensor cores), never on the CPU.

``fp32`` is the exact code path of before: no autocast context, no scaler, no
memory-format change, so float32 results are bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import Tensor, nn

from r2sweep.core.errors import ConfigError

__all__ = ["PRECISIONS", "Precision", "check_precision", "full_precision"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: Any, device: torch.device | None = None, field: str = "train.precision") -> str:
    """``name`` if it is a precision this ``device`` can run (None: check the name only).

    Raises:
        ConfigError: not one of :data:`PRECISIONS`, ``fp16`` off CUDA, or ``bf16``
            on a GPU without bfloat16 support; the message names ``field``.
    """
    if name not in PRECISIONS:
        raise ConfigError(field, name, f"one of {list(PRECISIONS)}")
    if device is None:
        return name
    if name == "fp16" and device.type != "cuda":
        # CPU autocast supports float16 only partially and slowly, and GradScaler's
        # inf checks assume a GPU; refusing is clearer than a run that crawls.
        raise ConfigError(field, name, f"fp16 needs a CUDA device (the device is {device.type}); "
                          "use bf16 on the CPU, or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(field, name, "this GPU has no bfloat16 support; use fp16 or fp32")
    return name


def full_precision(x: Tensor) -> ContextManager[Any]:
    """A region where autocast is off for ``x``'s device: quantizer range statistics
    (LSQ/EWGS steps, DKM centroids) must see float32 values, not bf16 matmuls."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class Precision:
    """What one training or evaluation loop does differently per ``train.precision``.

    Args:
        name: ``fp32``, ``bf16`` or ``fp16``.
        device: the loop's device; ``fp16`` is refused off CUDA.
        field: the config field ``name`` came from, named in errors.

    Raises:
        ConfigError: see :func:`check_precision`.
    """

    def __init__(self, name: str, device: torch.device, field: str = "train.precision") -> None:
        self.name = check_precision(name, device, field)
        self.device = device
        self.dtype = _DTYPES.get(self.name, torch.float32)
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "fp16" else None
        # Decided by prepare(): only a model with Conv2d layers on CUDA gains.
        self.channels_last = False

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> ContextManager[Any]:
        """The context the model's forward (and its loss) runs in."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` in channels-last memory format on CUDA when it has a Conv2d, else unchanged.

        Never on the CPU: oneDNN's NCHW kernels are as fast there for these
        models and the conversion costs copies, so the CPU keeps the default
        format (and float32 CPU results stay exactly as they were). Only the
        memory layout changes, not values or shapes.
        """
        self.channels_last = self.device.type == "cuda" and _has_conv2d(model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A batch on the device (channels-last images when the model is)."""
        if self.channels_last and x.dim() == 4:
            x = x.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        else:
            x = x.to(self.device, non_blocking=True)
        return x, y.to(self.device, non_blocking=True)

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer,
                      clip: Callable[[], object] | None = None) -> None:
        """Backward and one optimizer step (through the gradient scaler under fp16).

        ``clip`` (gradient clipping, say) runs between the two, on unscaled gradients.
        """
        if self.scaler is None:
            loss.backward()
            if clip is not None:
                clip()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(optimizer)
            clip()
        self.scaler.step(optimizer)  # skipped when a gradient is inf/NaN
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (fp16), so a resumed run continues with the same loss scale."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

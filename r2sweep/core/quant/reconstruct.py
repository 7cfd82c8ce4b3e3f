"""Block reconstruction: BRECQ (Li et al. 2021) and QDrop (Wei et al. 2022).

Layer-wise AdaRound (:mod:`r2sweep.core.quant.adaround`) learns each layer's
rounding against that layer's float output. Block reconstruction learns the
rounding of every layer of a block (:mod:`r2sweep.core.quant.blocks`) jointly,
against the block's float output, one block after another in execution order:

* the block's input comes from the network quantized so far (weights and
  activations of the blocks before it), its target from the float network;
* the output error is weighted per element by the diagonal Fisher information of
  the task loss (the squared gradient of the cross-entropy on the calibration
  labels with respect to the block's float output): errors where the loss is
  sensitive count more. The weight is ``1 + g^2 / mean(g^2)``: the plain squared
  error plus the Fisher term at the same average scale (BRECQ damps the same
  way, adding a constant to the Fisher diagonal);
* with activations quantized, the step of every activation quantizer inside the
  block is learned alongside the rounding (LSQ's gradient, Adam at ``act_lr``
  with a cosine schedule, BRECQ's 4e-5), starting from the calibrated range;
* QDrop: during reconstruction each activation element is left in float with
  probability ``drop_prob`` (independently per element and iteration), and the
  block's input likewise mixes the float network's input in. The flatter loss
  landscape this trains into is what lets 2-bit activations work. With
  ``drop_prob = 0`` this is BRECQ exactly.

The rounding itself is AdaRound's: ``V`` per weight, rectified sigmoid, the
regularizer with beta annealed from 20 to 2 after a warm-up
(:class:`~r2sweep.core.quant.adaround.AdaRoundSettings`), hard rounding at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from r2sweep.core.quant.adaround import AdaRoundSettings, AdaRoundWeight, weight_grid
from r2sweep.core.quant.blocks import Units, reconstruction_units
from r2sweep.core.quant.fake import ActivationQuantizer, QuantSpec, _safe_scale, binarize, qrange
from r2sweep.core.quant.layers import QuantLayer, quant_layers
from r2sweep.core.quant.learned import clamp_inclusive, floor_ste, grad_scale, ste

__all__ = ["NotCalled", "ReconstructionSettings", "capture", "fisher_weights", "reconstruct_model", "reconstruct_unit"]

# Calibration inputs go through the network in chunks of this many samples.
_CHUNK = 128
# An activation step is never learned below this (a zero step divides to NaN).
_MIN_STEP = 1e-8


@dataclass(frozen=True)
class ReconstructionSettings:
    """BRECQ's knobs on top of AdaRound's (``drop_prob > 0``: QDrop)."""

    rounding: AdaRoundSettings
    fisher: bool = True
    act_lr: float = 4e-5
    drop_prob: float = 0.0


class _Captured(Exception):
    """Raised by a capture hook: nothing after the captured module needs computing."""


class NotCalled(Exception):
    """The module is never called on the way through the model: its parent reads its weight
    instead (``nn.MultiheadAttention``'s ``out_proj``), so it has no inputs to reconstruct from."""


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, inputs: Tensor, *, output: bool) -> Tensor:
    """``module``'s first input (or its output) when ``model`` runs on ``inputs``, stacked over all samples."""
    pieces: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple[Tensor, ...], result: Tensor | None = None) -> None:
        pieces.append((result if output else args[0]).detach().clone())
        raise _Captured

    handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
    try:
        for start in range(0, inputs.shape[0], _CHUNK):
            try:
                model(inputs[start : start + _CHUNK])
            except _Captured:
                pass
    finally:
        handle.remove()
    if not pieces:
        raise NotCalled(type(module).__name__)
    return torch.cat(pieces)


def fisher_weights(model: nn.Module, module: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
    """Per-element weights ``1 + g^2 / mean(g^2)`` of ``module``'s output, ``g`` the gradient of the
    summed cross-entropy of ``model`` on ``(inputs, labels)`` with respect to that output.

    ``model`` must not modify the output in place (the caller's float copy has its
    in-place activations switched off). Its parameters' gradients are left untouched.
    """
    pieces: list[Tensor] = []

    def keep_gradient(_module: nn.Module, _args: tuple[Tensor, ...], result: Tensor) -> None:
        result.register_hook(lambda grad: pieces.append(grad.detach().clone()))

    handle = module.register_forward_hook(keep_gradient)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            for start in range(0, inputs.shape[0], _CHUNK):
                x = inputs[start : start + _CHUNK].clone().requires_grad_(True)
                loss = F.cross_entropy(model(x), labels[start : start + _CHUNK], reduction="sum")
                loss.backward()
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)
    squared = torch.cat(pieces).pow(2)
    return 1 + squared / squared.mean().clamp(min=1e-30)


class _SoftWeight(nn.Module):
    """A weight quantizer during reconstruction: the soft-rounded weight (ignores its input)."""

    def __init__(self, rounding: AdaRoundWeight) -> None:
        super().__init__()
        self.rounding = rounding

    def forward(self, _weight: Tensor) -> Tensor:
        return self.rounding.soft()


class _LearnedActivation(nn.Module):
    """A calibrated activation quantizer whose step is learned (LSQ), with QDrop's per-element dropping."""

    def __init__(self, quantizer: ActivationQuantizer, drop_prob: float, seed: int) -> None:
        super().__init__()
        self.quantizer = quantizer
        scale, _ = quantizer.qparams()
        self.binary = quantizer.signed and quantizer.bits == 1
        self.qmin, self.qmax = qrange(quantizer.bits, quantizer.signed)
        # 1-bit signed (two levels +-s) keeps its calibrated scale: LSQ's rule is for uniform grids.
        self.step = nn.Parameter(_safe_scale(scale).clone(), requires_grad=not self.binary)
        self.drop_prob = drop_prob
        self.seed = seed
        self._generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.binary:
            quantized = binarize(x, self.step.detach().to(x.dtype))
        else:
            step = floor_ste(grad_scale(self.step, 1.0 / math.sqrt(max(1, x[0].numel()) * self.qmax)), _MIN_STEP)
            u = clamp_inclusive(x / step, self.qmin, self.qmax)
            quantized = ste(torch.round(u), u) * step
        if self.drop_prob == 0:
            return quantized
        return torch.where(self._keep_float(x), x, quantized)

    def _keep_float(self, x: Tensor) -> Tensor:
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return torch.rand(x.shape, generator=self._generator, device=x.device) < self.drop_prob

    @torch.no_grad()
    def write_back(self) -> None:
        """Give the quantizer the learned step (its range buffers are what it quantizes with)."""
        q = self.quantizer
        step = self.step.detach().clamp(min=_MIN_STEP)
        if q.signed:
            bound = step if self.binary else step * self.qmax
            q.min_val.copy_(-bound)
            q.max_val.copy_(bound)
        else:
            q.min_val.zero_()
            q.max_val.copy_(step * self.qmax)


def _swap_in(wrappers: list[QuantLayer], specs: Mapping[str, QuantSpec], names: list[str],
             settings: ReconstructionSettings) -> tuple[list[AdaRoundWeight], list[_LearnedActivation]]:
    roundings, activations = [], []
    for index, (name, wrapper) in enumerate(zip(names, wrappers)):
        weight = wrapper.layer.weight.detach()
        rounding = AdaRoundWeight(weight, weight_grid(weight, specs[name]))
        wrapper.weight_quantizer = _SoftWeight(rounding)
        roundings.append(rounding)
        quantizer = wrapper.input_quantizer
        if isinstance(quantizer, ActivationQuantizer) and quantizer.calibrated:
            learned = _LearnedActivation(quantizer, settings.drop_prob, settings.rounding.seed + 1 + index)
            wrapper.input_quantizer = learned
            activations.append(learned)
    return roundings, activations


def reconstruct_unit(
    unit_module: nn.Module,
    wrappers: Mapping[str, QuantLayer],
    specs: Mapping[str, QuantSpec],
    inputs: Tensor,
    targets: Tensor,
    settings: ReconstructionSettings,
    *,
    float_inputs: Tensor | None = None,
    weights: Tensor | None = None,
    after: nn.Module | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """Learn the rounding (and activation steps) of one unit, then write its hard-rounded weights in place.

    Args:
        unit_module: the block (or single :class:`QuantLayer`) in the quantized network, in eval mode.
        wrappers: its quantized layers by name; ``specs`` their weight grids.
        inputs: the unit's inputs from the network quantized so far, ``(N, ...)``.
        targets: the float network's output of the unit (after ``after`` for a single layer).
        float_inputs: the float network's inputs of the unit, which QDrop mixes in (``drop_prob > 0``).
        weights: per-element weights of the squared error (:func:`fisher_weights`); None: plain.
        after: applied to a single layer's output before the comparison (its unfolded BatchNorm).
        progress: called as ``progress(iteration, loss)`` every 200 iterations.
    """
    names = list(wrappers)
    roundings, activations = _swap_in([wrappers[n] for n in names], specs, names, settings)
    rounding = settings.rounding
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=rounding.lr)
    steps = [a.step for a in activations if a.step.requires_grad]
    step_optimizer = torch.optim.Adam(steps, lr=settings.act_lr) if steps and settings.act_lr > 0 else None
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(step_optimizer, rounding.iterations) if step_optimizer else None
    generator = torch.Generator().manual_seed(rounding.seed)
    mix = torch.Generator().manual_seed(rounding.seed + 1000)
    count, batch = inputs.shape[0], min(rounding.batch_size, inputs.shape[0])
    # The error relative to the targets' (weighted) energy, as in layer-wise AdaRound:
    # lambda_r then weighs the regularizer the same whatever the unit's output scale.
    scale = weights if weights is not None else torch.ones_like(targets[:1])
    energy = (targets.pow(2) * scale).sum(dim=1).mean().clamp(min=1e-12)
    try:
        with torch.enable_grad():
            for iteration in range(rounding.iterations):
                index = torch.randint(count, (batch,), generator=generator).to(inputs.device)
                x = inputs[index]
                if float_inputs is not None and settings.drop_prob > 0:
                    keep = torch.rand(x.shape, generator=mix).to(x.device) < settings.drop_prob
                    x = torch.where(keep, float_inputs[index], x)
                output = unit_module(x)
                if after is not None:
                    output = after(output)
                error = (output - targets[index]).pow(2)
                if weights is not None:
                    error = error * weights[index]
                loss = error.sum(dim=1).mean() / energy
                beta = rounding.beta(iteration)
                if beta is not None and rounding.lambda_r > 0:
                    loss = loss + rounding.lambda_r * sum(r.regularizer(beta) for r in roundings)
                optimizer.zero_grad(set_to_none=True)
                if step_optimizer:
                    step_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step_optimizer:
                    step_optimizer.step()
                    schedule.step()
                if progress is not None and (iteration + 1) % 200 == 0:
                    progress(iteration + 1, float(loss.detach()))
    finally:
        with torch.no_grad():
            for name, rounding_weight in zip(names, roundings):
                wrapper = wrappers[name]
                wrapper.layer.weight.copy_(rounding_weight.hard())
                wrapper.weight_quantizer = nn.Identity()
                if isinstance(wrapper.input_quantizer, _LearnedActivation):
                    wrapper.input_quantizer.write_back()
                    wrapper.input_quantizer = wrapper.input_quantizer.quantizer


def reconstruct_model(
    quantized: nn.Module,
    reference: nn.Module,
    specs: Mapping[str, QuantSpec],
    calibration: Tensor,
    labels: Tensor | None,
    settings: ReconstructionSettings,
    *,
    following_bn: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Units:
    """Reconstruct every unit of ``quantized`` in execution order (weights written in place).

    Args:
        quantized: the network with its layers wrapped (:func:`~r2sweep.core.quant.layers.wrap_layers`),
            activation quantizers calibrated (or float), in eval mode.
        reference: its float twin before wrapping (same module names), in eval mode; its
            in-place activations are switched off here (the Fisher gradients need the outputs).
        specs: every quantized layer's weight grid, by name.
        labels: the calibration images' labels (the Fisher weights' task loss); None without ``settings.fisher``.
        following_bn: a single layer's unfolded BatchNorm, whose output it is compared after.
        progress: the note on any layer-wise fallback, then one line per unit.

    Returns:
        The units, with the note on any layer-wise fallback.
    """
    if settings.fisher and labels is None:
        raise ValueError("the Fisher weighting needs the calibration labels")
    for module in reference.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    following_bn = following_bn or {}
    wrappers = dict(quant_layers(quantized))
    units = reconstruction_units(reference)
    if units.note and progress is not None:
        progress(units.note)
    for number, unit in enumerate(units.units, 1):
        q_module, f_module = quantized.get_submodule(unit.name), reference.get_submodule(unit.name)
        bn = following_bn.get(unit.name) if not unit.is_block else None
        target_module = reference.get_submodule(bn) if bn else f_module
        if progress is not None:
            kind = f"block of {len(unit.layers)} layers" if unit.is_block else "layer"
            progress(f"{number}/{len(units.units)} {unit.name} ({kind})")
        reconstruct_unit(
            q_module,
            {name: wrappers[name] for name in unit.layers},
            specs,
            capture(quantized, q_module, calibration, output=False),
            capture(reference, target_module, calibration, output=True),
            settings,
            float_inputs=capture(reference, f_module, calibration, output=False) if settings.drop_prob > 0 else None,
            weights=fisher_weights(reference, target_module, calibration, labels) if settings.fisher else None,
            after=quantized.get_submodule(bn) if bn else None,
        )
    return units

"""BatchNorm folding and re-estimation for post-training quantization.

Weights are quantized after BatchNorm is folded into the preceding conv, since
that is the weight a deployed integer kernel sees. After quantizing, the BN
statistics of an unfolded network can be re-estimated on a few batches to undo
the shift quantization causes in the activations.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from r2sweep.core.errors import ConfigError
from r2sweep.core.graph import conv_bn_pairs

__all__ = ["batch_inputs", "conv_bn_pairs", "fold_batchnorm", "reestimate_bn"]


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _fold_into(conv: nn.Module, bn: _BatchNorm) -> None:
    # fuse_conv_bn_weights reshapes BN's per-channel factors to the conv weight's
    # dims, so Conv1d/2d/3d (and grouped convs: dim 0 is still out_channels) fold alike.
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    conv.weight = weight
    conv.bias = bias  # registers a bias parameter when the conv had none


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every conv-then-BN pair folded.

    Each BatchNorm1d/2d/3d that directly follows a conv of its dimensionality
    (see :func:`conv_bn_pairs`) is folded into the conv's weight and bias using
    its running statistics and replaced by ``nn.Identity()``. The copy keeps
    ``model``'s class and module names; ``model`` itself is not changed. BNs
    without running statistics are left in place. A model ``torch.fx`` cannot
    trace has no pairs: the copy is returned unfolded
    (:func:`~r2sweep.core.graph.graph_notes` says so).
    """
    # The pairs of ``model`` itself (its trace is cached across the per-epoch
    # proxy's calls); the copy has the same module names.
    pairs = conv_bn_pairs(model)
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            bn = folded.get_submodule(bn_name)
            if bn.running_mean is None or bn.running_var is None:
                continue  # track_running_stats=False: eval uses batch stats, not foldable
            _fold_into(folded.get_submodule(conv_name), bn)
            _replace_module(folded, bn_name, nn.Identity())
    return folded


def batch_inputs(batch: object) -> Tensor:
    """The input tensor of a batch: loaders yield ``(inputs, targets)``; bare tensors pass."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"expected tensors or (inputs, targets) pairs, got {type(batch).__name__}")
    return batch


def reestimate_bn(model: nn.Module, batches: Iterable[Tensor], num_batches: int) -> int:
    """Recompute every BatchNorm's running statistics on up to ``num_batches`` batches.

    Running statistics are reset and re-accumulated as a cumulative (equal-weight)
    average (``momentum=None``). Only the BN layers run in train mode: dropout
    and the like stay in eval mode so the statistics match what inference sees.
    No gradients are computed. Each module's ``training`` flag and each BN's
    ``momentum`` are restored afterwards. Parameters are not changed.

    Args:
        model: the network, modified in place.
        batches: input tensors, or ``(inputs, targets)`` pairs.
        num_batches: at most this many batches are used (>= 1).

    Returns:
        The number of batches used.

    Raises:
        ConfigError: ``num_batches`` is not an integer >= 1.
        ValueError: ``batches`` yielded nothing.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError("downstream.bn_batches", num_batches, "an integer >= 1")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    used = 0
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in batches:
                if used >= num_batches:
                    break
                model(batch_inputs(batch))
                used += 1
    finally:
        for module, mode in modes.items():
            module.training = mode
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if used == 0:
        raise ValueError("reestimate_bn got no batches; the BN statistics are reset to mean 0, variance 1")
    return used

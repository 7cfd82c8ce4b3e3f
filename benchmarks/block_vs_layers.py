"""One residual block, rounded three ways: to nearest, layer by layer (AdaRound), jointly (BRECQ).

The block and its small trained net are those of ``tests/test_quant_reconstruct.py``.
Both learned roundings see the same inputs (the block's input in the float net) and
are scored the same way: the squared error of the block's output against the float
block's. What it shows is how much the comparison depends on the rounding having
converged (every rounding variable decided) within the iterations given.

    .venv/bin/python benchmarks/block_vs_layers.py --bits 2 --iters 1000 --lr 1e-3 1e-2 2e-2
    .venv/bin/python benchmarks/block_vs_layers.py --bits 2 --iters 500 --lr 1e-2 --lambdas 0.003 0.01 0.03
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from r2sweep.core.quant.adaround import adaround_layer
from r2sweep.core.quant.fake import QuantSpec, quantize_weight
from r2sweep.core.quant.layers import quant_layers, wrap_layers
from r2sweep.core.quant.methods import PTQConfig
from r2sweep.core.quant.reconstruct import capture, reconstruct_unit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_quant_reconstruct import _trained_net  # noqa: E402  the block the test checks

LAYERS = (("block.conv1", "block.bn1"), ("block.conv2", "block.bn2"))


def _wrapped(net: nn.Module) -> nn.Module:
    return wrap_layers(copy.deepcopy(net).eval(), lambda info: nn.Identity(), lambda info: nn.Identity())


def errors(bits: int, iters: int, lr: float, lam: float) -> dict[str, float]:
    net, x, _ = _trained_net()
    spec = QuantSpec(bits, True, "channel", "mse")
    cfg = PTQConfig(algorithm="brecq", adaround_iters=iters, adaround_lr=lr, adaround_lambda=lam, fisher=False)
    inputs, target = capture(net, net.block, x, output=False), capture(net, net.block, x, output=True)

    def score(q: nn.Module) -> float:
        with torch.no_grad():
            return float((q.block(inputs) - target).pow(2).mean())

    rtn = _wrapped(net)
    for name, wrapper in quant_layers(rtn):
        if name.startswith("block."):
            with torch.no_grad():
                wrapper.layer.weight.copy_(quantize_weight(wrapper.layer.weight, spec))
    layers = _wrapped(net)
    for name, bn in LAYERS:  # in order, each against its BatchNorm's float output, the earlier one already rounded
        wrapper = dict(quant_layers(layers))[name]
        new = adaround_layer(wrapper.layer, capture(layers, wrapper, x, output=False),
                             capture(net, net.get_submodule(bn), x, output=True), spec, cfg.adaround_settings(),
                             after=net.get_submodule(bn))
        with torch.no_grad():
            wrapper.layer.weight.copy_(new)
    block = _wrapped(net)
    wrappers = {n: w for n, w in quant_layers(block) if n.startswith("block.")}
    reconstruct_unit(block.block, wrappers, dict.fromkeys(wrappers, spec), inputs, target, cfg.reconstruction_settings())
    return {"round to nearest": score(rtn), "layer-wise AdaRound": score(layers), "BRECQ (block)": score(block)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| bits | iterations | rounding lr | lambda | round to nearest | layer-wise AdaRound | BRECQ (block) |")
    print("|---|---|---|---|---|---|---|")
    for lr in args.lr:
        for lam in args.lambdas:
            e = errors(args.bits, args.iters, lr, lam)
            print(f"| {args.bits} | {args.iters} | {lr:g} | {lam:g} | " + " | ".join(f"{v:.3f}" for v in e.values()) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

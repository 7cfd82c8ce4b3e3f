"""Training-step cost of R2-Loss: step time with each kind over a plain step.

Setting (issue: foundation): ResNet-18, 32x32 input, batch 64, SGD, 2 CPU threads.
``cifar_stem`` is the usual CIFAR network (3x3 stride-1 first conv, no max-pool);
``imagenet_stem`` keeps torchvision's 7x7 stride-2 stem and max-pool on 32x32
input, so the convolutions shrink 16x while the weights stay: the worst case for
a loss whose cost is passes over the weights.

Every variant trains its own copy of the same model. Repetitions are interleaved
(each repetition times one step of every variant, in a shuffled order) and the
figure is the median over repetitions of (variant step / plain step in the same
repetition), so machine noise that lasts longer than a few seconds cancels.
``naive_*`` are the obvious autograd formulas, for comparison.

    python benchmarks/r2_overhead.py                 # both settings, 60 repetitions
    python benchmarks/r2_overhead.py --naive --reps 20   # with the naive baselines
    python benchmarks/r2_overhead.py --reps 10 --settings cifar_stem

Besides the median ratio it prints the ratio of the fastest steps (min over
repetitions), a second estimator that ignores slow outliers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import random
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from r2sweep.core.losses import make_r2_loss, native, regularized_layers
from r2sweep.core.models import create_model

STRENGTH = {"linf": 0.1, "margin": 0.01, "softminmax": 0.01}
# Targets per setting (issue 23 for Soft-Min-Max: <= 1.03x on the CIFAR stem, <= 1.15x
# in the worst case).
TARGET = {
    "cifar_stem": {"linf": 1.02, "margin": 1.02, "softminmax": 1.03},
    "imagenet_stem": {"softminmax": 1.15},
}


class NaiveR2(nn.Module):
    """The formulas of R2LOSS.md written with plain autograd ops (the baseline)."""

    def __init__(self, model: nn.Module, kind: str, strength: float) -> None:
        super().__init__()
        self.kind, self.strength = kind, strength
        self.weights = [w for _, w in regularized_layers(model)]
        init = [w.detach().abs().max() for w in self.weights]
        if kind == "margin":
            self.margins = nn.ParameterList(nn.Parameter(m.clone()) for m in init)
        if kind == "softminmax":
            self.alphas = nn.ParameterList(nn.Parameter(5.0 / m) for m in init)

    def forward(self) -> torch.Tensor:
        total = 0.0
        for i, w in enumerate(self.weights):
            if self.kind == "linf":
                total = total + w.abs().max()
            elif self.kind == "margin":
                m = self.margins[i]
                total = total + m * m + F.relu(w.abs() - m.abs()).sum()
            else:
                a, v = self.alphas[i], w.reshape(-1)
                total = total + (v * torch.softmax(a * v, 0)).sum() - (v * torch.softmax(-a * v, 0)).sum()
                total = total + torch.exp(-a)
        return self.strength * total


def build_variants(stem: str, naive: bool) -> dict[str, tuple]:
    torch.manual_seed(0)
    base = create_model("resnet18", num_classes=10, in_channels=3, input_size=32, stem=stem)
    variants = {}
    # softminmax_eager: the same loss with its compiled kernel switched off (the eager
    # PyTorch path a machine without a C compiler runs).
    names = ["plain", "linf", "margin", "softminmax", "softminmax_eager"]
    if naive:
        names += ["naive_linf", "naive_margin", "naive_softminmax"]
    for name in names:
        model = copy.deepcopy(base)
        kind = name.removeprefix("naive_").removesuffix("_eager")
        if name == "plain":
            r2 = None
        elif name.startswith("naive_"):
            r2 = NaiveR2(model, kind, STRENGTH[kind])
        else:
            r2 = make_r2_loss(model, kind, STRENGTH[kind])
        groups = [{"params": model.parameters(), "weight_decay": 5e-4}]
        if r2 is not None and list(r2.parameters()):
            groups.append({"params": r2.parameters(), "weight_decay": 0.0})
        variants[name] = (model, r2, torch.optim.SGD(groups, lr=0.01, momentum=0.9), name.endswith("_eager"))
    return variants


def train_step(model, r2, optimizer, eager, x, y) -> None:
    with native.disabled() if eager else contextlib.nullcontext():
        _step(model, r2, optimizer, x, y)


def _step(model, r2, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if r2 is not None:
        loss = loss + r2()  # after the forward, as r2sweep.core.train does
    loss.backward()
    optimizer.step()


def measure(stem: str, reps: int, batch: int, naive: bool, warmup: int = 3) -> dict[str, dict[str, float]]:
    variants = build_variants(stem, naive)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    for name, variant in variants.items():
        for _ in range(warmup):
            train_step(*variant, x, y)
    order = list(variants)
    shuffle = random.Random(0)
    step_s = {name: [] for name in variants}
    for rep in range(reps):
        shuffle.shuffle(order)
        for name in order:
            started = time.perf_counter()
            train_step(*variants[name], x, y)
            step_s[name].append(time.perf_counter() - started)
        print(f"  {stem}: repetition {rep + 1}/{reps}", end="\r", flush=True)
    print()
    results = {}
    for name, times in step_s.items():
        ratios = sorted(t / p for t, p in zip(times, step_s["plain"]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = {
            "median_step_ms": 1e3 * statistics.median(times),
            "median_ratio": statistics.median(ratios),
            "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[2],
            "min_ratio": min(times) / min(step_s["plain"]),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="cifar_stem,imagenet_stem")
    parser.add_argument("--naive", action="store_true", help="also time the naive autograd formulas")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stems = {"cifar_stem": "small", "imagenet_stem": "imagenet"}
    report = {"torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
              "softminmax_path": native.status(), "settings": {}}
    print(f"Soft-Min-Max: {native.status()}")
    for setting in args.settings.split(","):
        results = measure(stems[setting], args.reps, args.batch, naive=args.naive)
        report["settings"][setting] = results
        print(f"\n{setting}: ResNet-18, 32x32, batch {args.batch}, {args.threads} threads, {args.reps} interleaved reps")
        print("| variant | step ms (median) | ratio over plain (median) | IQR | ratio of fastest steps | target |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            target = TARGET.get(setting, {}).get(name, "")
            target = f"<= {target:.2f}" if target else ""
            print(
                f"| {name} | {r['median_step_ms']:.0f} | {r['median_ratio']:.3f}x | "
                f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | {r['min_ratio']:.3f}x | {target} |"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()

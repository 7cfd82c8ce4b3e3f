"""First measurement of the R2 effect: MobileNet-V2 on digits, with and without R2.

Each (R2 setting, seed) is one real trial (``r2sweep.core.trial.run_trial``): one
pre-training, then every recipe at 4 and 2 bits on copies of the same weights.
Recipes, from naive to strongest:

* ``naive``: round-to-nearest, per-tensor min-max weights, BN folded (deployment's
  plainest path);
* ``naive_nofold``: the same with BN kept as a float per-channel affine (the
  pilot's "min-max": R2 restricts exactly these weights);
* ``rtn_mse_bn``: round-to-nearest, per-tensor MSE-clipped weights, BN
  re-estimated on 512 training images (the pilot's "MSE+BN");
* ``adaround_tensor_bn``: AdaRound on the per-tensor MSE grid, BN re-estimated;
* ``adaround_channel_bn``: AdaRound on the per-channel MSE grid, BN re-estimated
  (the strongest PTQ here);
* ``lsq``: LSQ QAT with per-channel weight steps, a few epochs.

All at A8 (activations calibrated min-max on 256 training images), first and
last layer at 8 bits.

Usage (the figures in benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/trial_effect.py --seeds 0 1 2 --out benchmarks/trial_effect.json

The table printed at the end is mean +- standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.quant.methods import load_downstream
from r2sweep.core.trial import run_trial

RECIPES = {
    "naive": {"method": "ptq", "algorithm": "rtn", "granularity": "tensor", "range": "minmax"},
    "naive_nofold": {"method": "ptq", "algorithm": "rtn", "granularity": "tensor", "range": "minmax", "bn_fold": False},
    "rtn_mse_bn": {"method": "ptq", "algorithm": "rtn", "granularity": "tensor", "range": "mse", "bn_reestimate": True},
    "adaround_tensor_bn": {"method": "ptq", "algorithm": "adaround", "granularity": "tensor", "range": "mse", "bn_reestimate": True},
    "adaround_channel_bn": {"method": "ptq", "algorithm": "adaround", "granularity": "channel", "range": "mse", "bn_reestimate": True},
    "lsq": {"method": "qat", "algorithm": "lsq", "granularity": "channel"},
}


def trial_config(args: argparse.Namespace, r2: dict, seed: int) -> dict:
    downstream = []
    for name in args.recipes:
        entry = dict(RECIPES[name], weight_bits=args.bits, act_bits=8, tag=name.replace("_", "-"))
        if entry.get("bn_reestimate"):
            entry["bn_batches"] = 8  # 8 x 64 = 512 training images
        if entry["algorithm"] == "adaround":
            entry.update(adaround_iters=args.adaround_iters, **({"adaround_lr": args.adaround_lr} if args.adaround_lr else {}))
        if entry["method"] == "qat":
            entry.update(epochs=args.qat_epochs, lr=args.qat_lr)
        downstream.append(entry)
    return {
        "seed": seed,
        "data": {"name": "digits"},
        "model": {"name": "mobilenet_v2", "width": args.width},
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": 64, "weight_decay": 5e-4},
        "r2": r2,
        "downstream": downstream,
    }


def result_key(recipe: str, bits: int) -> str:
    entry = load_downstream([{**RECIPES[recipe], "weight_bits": [bits], "act_bits": 8, "tag": recipe.replace("_", "-")}])[0]
    return f"{entry.result_name(bits)}/top1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument(
        "--r2", nargs="+", default=["linf:0.1", "linf:0.1:channel"],
        help="R2 settings compared with no R2, as KIND:STRENGTH[:GRANULARITY]",
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument(
        "--recipes", nargs="+", choices=list(RECIPES),
        default=["naive", "naive_nofold", "rtn_mse_bn", "adaround_channel_bn", "lsq"],
    )
    parser.add_argument("--adaround-iters", type=int, default=500)
    parser.add_argument("--adaround-lr", type=float, default=None,
                        help="AdaRound's rounding lr (default: the field's; the recorded figures used 1e-3)")
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--qat-lr", type=float, default=0.005)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write every trial's metrics here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = {"none": {"kind": "none"}}
    for text in args.r2:
        kind, strength, *granularity = text.split(":")
        settings[text] = {"kind": kind, "strength": float(strength), "granularity": granularity[0] if granularity else "tensor"}
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for seed in args.seeds:
        for name, r2 in settings.items():
            config = load_trial_config(trial_config(args, r2, seed))
            started = time.perf_counter()
            metrics = run_trial(config, device=torch.device("cpu"))
            metrics["seed"] = seed
            results[name].append(metrics)
            print(f"seed {seed} r2 {name}: FP {metrics['fp/top1']:.1f}, kurtosis {metrics['weights/kurtosis']:.1f}, "
                  f"{time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))

    def cell(name: str, key: str) -> str:
        values = [m[key] for m in results[name] if key in m]
        if not values:
            return "diverged"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        missing = len(results[name]) - len(values)
        note = f" ({missing} diverged)" if missing else ""
        return f"{statistics.mean(values):.1f} +- {spread:.1f}{note}"

    names = list(settings)
    print(f"| result | {' | '.join(names)} |")
    print("|---|" + "---|" * len(names))
    keys = ["fp/top1", "weights/kurtosis", "weights/max_abs"] + [result_key(r, b) for r in args.recipes for b in args.bits]
    for key in keys:
        print(f"| {key} | {' | '.join(cell(n, key) for n in names)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

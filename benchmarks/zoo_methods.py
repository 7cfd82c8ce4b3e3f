"""Networks r2sweep never registered, through every downstream method, on real data (issue 41).

The recipe a new user would try: a torchvision builder through the factory contract
(``model: {factory: "torchvision.models:<builder>", num_classes: 10}``), scikit-learn's
digits upsampled to 32x32 with 3 channels (made here by a user's dataset factory,
:func:`digits_rgb32`), 3 epochs of Adam, then RTN W4A8, AdaRound W2A8, LSQ W4A8 (1 epoch)
and DKM W2 (1 epoch). Plus a small torchvision ViT and Swin. CPU.

Pre-training goes through r2sweep's pre-training cache (``--cache``), so a second run
with other downstream settings re-uses the pre-trained weights; the cache key is the
whole pre-training config, so nothing stale is re-used.

    .venv/bin/python benchmarks/zoo_methods.py --models shufflenet_v2_x0_5 regnet_x_400mf \
        --cache /tmp/zoo-cache --out benchmarks/results/zoo_methods.json

Prints one markdown row per model (and the trial's notes), and merges the rows into
``--out`` (JSON, one entry per model).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data import DataSplits
from r2sweep.core.data.stratified import stratified_split
from r2sweep.core.data.digits import digits_arrays
from r2sweep.core.pretrain_cache import PretrainCache
from r2sweep.core.trial import run_trial

MODELS = {
    "convnext_tiny": {"factory": "torchvision.models:convnext_tiny", "num_classes": 10},
    "shufflenet_v2_x0_5": {"factory": "torchvision.models:shufflenet_v2_x0_5", "num_classes": 10},
    "regnet_x_400mf": {"factory": "torchvision.models:regnet_x_400mf", "num_classes": 10},
    "efficientnet_b0": {"factory": "torchvision.models:efficientnet_b0", "num_classes": 10},
    "mnasnet0_5": {"factory": "torchvision.models:mnasnet0_5", "num_classes": 10},
    "vit": {"factory": "torchvision.models.vision_transformer:VisionTransformer", "image_size": 32, "patch_size": 4,
            "num_layers": 4, "num_heads": 4, "hidden_dim": 128, "mlp_dim": 256},
    "swin": {"factory": "torchvision.models.swin_transformer:SwinTransformer", "patch_size": [2, 2], "embed_dim": 48,
             "depths": [2, 2], "num_heads": [3, 6], "window_size": [4, 4]},
}
RESULTS = {  # column -> the trial's result name
    "RTN W4A8": "ptq_rtn_w4a8",
    "AdaRound W2A8": "ptq_adaround_w2a8",
    "LSQ W4A8": "qat_lsq_w4a8",
    "DKM W2": "dkm_w2",
}
DOWNSTREAM = [
    {"method": "ptq", "algorithm": "rtn", "weight_bits": [4]},
    {"method": "ptq", "algorithm": "adaround", "weight_bits": [2]},
    {"method": "qat", "algorithm": "lsq", "weight_bits": [4], "epochs": 1},
    {"method": "dkm", "weight_bits": [2], "epochs": 1},
]


def digits_rgb32(seed: int, val_fraction: float | None = None) -> DataSplits:
    """scikit-learn's digits, bilinearly upsampled to 32x32 and repeated to 3 channels, standardised on train."""
    pixels, targets = digits_arrays()
    images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.as_tensor(targets, dtype=torch.int64)
    train_idx, val_idx = stratified_split(targets, 0.2 if val_fraction is None else val_fraction, seed)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    return DataSplits(train=TensorDataset((images[train_idx] - mean) / std, labels[train_idx]),
                      val=TensorDataset((images[val_idx] - mean) / std, labels[val_idx]),
                      num_classes=10, in_channels=3, input_size=32)


def trial_config(model: str, r2: dict) -> dict:
    return {
        "seed": 0,
        "data": {"factory": "benchmarks.zoo_methods:digits_rgb32"},
        "model": MODELS[model],
        "train": {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0},
        "r2": r2,
        "proxy": {"result": "fp"},
        "downstream": DOWNSTREAM,
    }


def _cell(metrics: dict, result: str) -> str:
    if metrics.get(f"{result}/diverged"):
        return "diverged"
    value = metrics.get(f"{result}/top1")
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cache", default=None, help="pre-training cache folder (re-used across runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r2", default="none", choices=["none", "linf"], help="pre-train without R2 or with L-inf (0.01)")
    parser.add_argument("--out", default=None, help="JSON file the rows are merged into")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r2 = {"kind": "none"} if args.r2 == "none" else {"kind": "linf", "strength": 0.01}
    cache = PretrainCache(args.cache) if args.cache else None
    print("| model | FP | " + " | ".join(RESULTS) + " | seconds |")
    print("|---" * (len(RESULTS) + 3) + "|")
    rows = {}
    for name in args.models:
        started = time.perf_counter()
        metrics = run_trial(load_trial_config(trial_config(name, r2)), cache=cache, cache_label=f"zoo/{name}")
        seconds = time.perf_counter() - started
        cells = [_cell(metrics, result) for result in RESULTS.values()]
        print(f"| {name} | {metrics['fp/top1']:.1f} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)
        if metrics.get("notes"):
            print(f"  notes: {metrics['notes']}", flush=True)
        rows[name] = {"fp": metrics["fp/top1"], **dict(zip(RESULTS, cells)), "seconds": round(seconds, 1),
                      "notes": metrics.get("notes", ""), "r2": args.r2}
    if args.out:
        out = Path(args.out)
        merged = json.loads(out.read_text()) if out.is_file() else {}
        merged.update({f"{name}/{args.r2}": row for name, row in rows.items()})
        out.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

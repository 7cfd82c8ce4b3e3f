"""The GPU path: one trial on CUDA against the same trial on the CPU, and what an
epoch costs at CIFAR scale.

1. **Same trial, two devices.** MobileNet-V2 (w0.25) on digits with L-inf R2,
   then every downstream family (per-tensor RTN W4, AdaRound W2, LSQ W2A2,
   DKM 1-bit), run by ``run_trial`` on each device in ``--devices``. The
   accuracies should agree within seed-level noise (kernels differ, so the
   numbers are not bit-identical); the times say what the GPU buys on a model
   this small.
2. **CIFAR-scale cost.** A synthetic CIFAR-10 (random pixels in the official
   pickled-batch format, 50k + 10k images) read by the real loader with its
   augmentation, and one pre-training epoch with R2 per model on the first
   device: seconds per epoch, from which the cost of a setting follows
   (epochs x seconds, plus the downstream step).

    python benchmarks/device_check.py --devices cuda cpu --out results/device
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.trial import run_trial

DIGITS_TRIAL = {
    "seed": 0,
    "data": {"name": "digits"},
    "model": {"name": "mobilenet_v2", "width": 0.25},
    "train": {"epochs": 15, "batch_size": 64, "optimizer": "sgd", "lr": 0.02, "weight_decay": 5.0e-4},
    "r2": {"kind": "linf", "strength": 0.1},
    "downstream": [
        {"method": "ptq", "algorithm": "rtn", "weight_bits": [4], "act_bits": 8, "granularity": "tensor",
         "range": "mse", "bn_reestimate": True},
        {"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "act_bits": 8, "adaround_iters": 300},
        {"method": "qat", "algorithm": "lsq", "weight_bits": [2], "act_bits": 2, "epochs": 2},
        {"method": "dkm", "weight_bits": [1], "epochs": 2},
    ],
}


def write_synthetic_cifar10(root: Path, train: int = 50_000, test: int = 10_000) -> None:
    """Random images in the official ``cifar-10-batches-py`` layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def dump(name: str, n: int) -> None:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", train // 5)
    dump("test_batch", test)


def timed_trial(data: dict, device: torch.device) -> dict:
    config = load_trial_config(data)
    epochs: list[float] = []
    last = [time.perf_counter()]

    def report(metrics: dict) -> None:
        if "final" not in metrics:
            now = time.perf_counter()
            epochs.append(now - last[0])
            last[0] = now

    started = time.perf_counter()
    final = run_trial(config, report, device=device, progress=lambda line: print(line, flush=True))
    final = {k: v for k, v in final.items() if k.endswith("/top1") or k.startswith("time/")}
    final["wall_s"] = time.perf_counter() - started
    final["epoch_s_median"] = float(np.median(epochs)) if epochs else None
    return final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--cifar-models", nargs="*", default=["resnet18", "mobilenet_v2", "mobilenet_v1"])
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers for the CIFAR epoch")
    parser.add_argument("--out", type=Path, default=Path("device_check"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/r2sweep-device-check"),
                        help="where the synthetic CIFAR-10 is written (~180 MB)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "cpu_threads": torch.get_num_threads(), "digits": {}, "cifar10_epoch": {}}

    def save() -> None:
        (args.out / "device_check.json").write_text(json.dumps(report, indent=1))

    for name in args.devices:
        print(f"== digits trial on {name}", flush=True)
        report["digits"][name] = timed_trial(DIGITS_TRIAL, torch.device(name))
        save()
    if args.cifar_models:
        root = args.scratch / "synthetic-cifar"
        write_synthetic_cifar10(root)
        device = torch.device(args.devices[0])
        for model in args.cifar_models:
            print(f"== one CIFAR-10-sized epoch of {model} on {device}", flush=True)
            data = {
                "seed": 0,
                "data": {"name": "cifar10", "root": str(root)},
                "model": {"name": model},
                "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "num_workers": args.workers},
                "r2": {"kind": "linf", "strength": 0.01},
                "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
            }
            report["cifar10_epoch"][model] = timed_trial(data, device)
            save()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

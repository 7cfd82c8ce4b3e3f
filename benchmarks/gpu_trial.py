"""A trial that keeps a GPU busy: step time, GPU utilisation, accuracy parity and packing.

On one CUDA GPU, with the CIFAR-stem ResNet-18 on CIFAR-shaped synthetic data
(3x32x32, 10 classes; nothing is downloaded), through r2sweep's own training code:

1. **Step time and utilisation** per ``train.precision`` (fp32, bf16): the
   pre-training epoch loop (autocast, R2 in fp32, channels-last) over in-memory
   batches; the median milliseconds per step after a warm-up, and the GPU's
   utilisation sampled every 100 ms during the timed steps (``nvidia-smi``, or
   ``torch.cuda.utilization()`` when pynvml is there).
2. **Accuracy parity**: ``pretrain`` for a few epochs on a learnable synthetic
   task (noisy class prototypes) at each precision, same seed; val top-1 each.
3. **Packing**: four trials on one GPU at 0.25 GPU each, as ``ray.remote`` tasks
   with ``num_gpus=0.25`` (what ``sweep.resources_per_trial: {gpu: 0.25}`` asks
   Ray for), each running r2sweep's ``pretrain``; start/end per trial, whether
   all four overlapped, and the wall time against four times one trial alone.

Prints a markdown table and writes everything to ``--out`` (JSON).

    .venv/bin/python benchmarks/gpu_trial.py --out benchmarks/results/gpu_trial.json   # ~3-5 min on an H200
    .venv/bin/python benchmarks/gpu_trial.py --smoke --out /tmp/gpu_trial_smoke.json   # CPU, tiny: the code path only
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from r2sweep.core.config.sections import R2Config, TrainConfig
from r2sweep.core.data import create_data, make_loader
from r2sweep.core.models import create_model
from r2sweep.core.precision import Precision
from r2sweep.core.train import _train_one_epoch, make_optimizer, pretrain

R2 = {"kind": "linf", "strength": 0.01}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of each part; ``--smoke`` shrinks everything to seconds on a CPU."""
    if args.smoke:
        return {"device": "cpu", "width": 0.125, "batch": 16, "warmup": 1, "steps": 3, "parity_samples": 200,
                "parity_epochs": 1, "pack_samples": 100, "pack_epochs": 1}
    return {"device": "cuda", "width": 1.0, "batch": args.batch_size, "warmup": args.warmup, "steps": args.steps,
            "parity_samples": args.parity_samples, "parity_epochs": args.parity_epochs,
            "pack_samples": args.pack_samples, "pack_epochs": args.pack_epochs}


def resnet18(width: float) -> torch.nn.Module:
    return create_model("resnet18", num_classes=10, in_channels=3, input_size=32, width=width, stem="small")


# --- GPU utilisation ---------------------------------------------------------------------------


class UtilisationSampler:
    """Samples the GPU's utilisation (percent) every ``period`` seconds in a background thread."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self.samples: list[float] = []
        self.source = self._pick_source()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _pick_source() -> str | None:
        if not torch.cuda.is_available():
            return None
        try:
            torch.cuda.utilization()
            return "torch.cuda.utilization"
        except Exception:  # noqa: BLE001 - pynvml missing or failing (its own error types): use the command line
            return "nvidia-smi" if shutil.which("nvidia-smi") else None

    def _read(self) -> float | None:
        if self.source == "torch.cuda.utilization":
            return float(torch.cuda.utilization())
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5, check=False)
        return float(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def start(self) -> None:
        if self.source is not None and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> dict[str, Any]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        s = self.samples
        return {"source": self.source, "samples": len(s), "mean_pct": statistics.fmean(s) if s else None,
                "median_pct": statistics.median(s) if s else None}


# --- 1. step time ------------------------------------------------------------------------------


class TimedBatches:
    """Yields ``steps`` batches and records when each was asked for (the previous step done).

    The training loop reads its losses with ``.item()`` every step, so the GPU is
    already synchronized there; the extra ``synchronize`` only makes the stamp exact.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, warmup: int, steps: int, sampler: UtilisationSampler):
        self.x, self.y, self.batch, self.warmup, self.steps, self.sampler = x, y, batch, warmup, steps, sampler
        self.stamps: list[float] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        for step in range(self.warmup + self.steps + 1):
            if self.x.is_cuda:
                torch.cuda.synchronize()
            if step == self.warmup:
                self.sampler.start()
            if step >= self.warmup:
                self.stamps.append(time.perf_counter())
            if step == self.warmup + self.steps:
                return
            start = (step * self.batch) % (n - self.batch + 1)
            yield self.x[start : start + self.batch], self.y[start : start + self.batch]


def step_time(precision: str, cfg: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model = resnet18(cfg["width"]).to(device)
    r2 = R2Config(**R2).build(model)
    train = TrainConfig(batch_size=cfg["batch"], lr=0.05, precision=precision, device=cfg["device"])
    amp = Precision(precision, device)
    amp.prepare(model)
    r2.to(device)
    optimizer = make_optimizer(model, r2, train)
    # Host tensors, as a real loader hands them over: the copy to the GPU is part of a step.
    x = torch.randn(8 * cfg["batch"], 3, 32, 32)
    y = torch.randint(0, 10, (8 * cfg["batch"],))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    sampler = UtilisationSampler()
    batches = TimedBatches(x, y, cfg["batch"], cfg["warmup"], cfg["steps"], sampler)
    _train_one_epoch(model, r2, batches, optimizer, amp)
    utilisation = sampler.stop()
    steps_ms = [1000 * (b - a) for a, b in zip(batches.stamps, batches.stamps[1:])]
    return {"precision": precision, "batch_size": cfg["batch"], "steps": len(steps_ms),
            "step_ms_median": statistics.median(steps_ms), "step_ms_p90": sorted(steps_ms)[int(0.9 * (len(steps_ms) - 1))],
            "images_per_s": cfg["batch"] / (statistics.median(steps_ms) / 1000), "channels_last": amp.channels_last,
            "gpu_utilisation": utilisation,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


# --- 2. accuracy parity -------------------------------------------------------------------------


def train_trial(precision: str, device: str, width: float, samples: int, epochs: int, batch: int,
                noise: float) -> dict[str, Any]:
    """One r2sweep pre-training on learnable CIFAR-shaped synthetic data (also a packed trial's body).

    ``noise`` is the per-pixel noise std around unit-std class prototypes: high
    enough that the task is not solved in one epoch, so a precision gap could show.
    """
    started = time.time()
    data = create_data("synthetic", seed=0, num_samples=samples, input_size=32, channels=3, noise=noise)
    torch.manual_seed(0)
    model = resnet18(width)
    train = TrainConfig(epochs=epochs, batch_size=batch, lr=0.05, precision=precision, device=device)
    final = pretrain(model, R2Config(**R2).build(model), make_loader(data.train, batch, shuffle=True, seed=0),
                     make_loader(data.val, 512, shuffle=False, seed=0), train)
    return {"precision": precision, "val_top1": final["val/top1"], "train_loss": final["train/loss"],
            "epochs": epochs, "samples": samples, "start": started, "end": time.time()}


# --- 3. packing ---------------------------------------------------------------------------------


def _warm_worker(on_gpu: bool) -> None:
    # What a trial's first call would otherwise import (seconds on a loaded machine).
    import r2sweep.core.data
    import r2sweep.core.models
    import r2sweep.core.train  # noqa: F401 - imported for its cost

    if on_gpu:
        torch.zeros(1, device="cuda")
    time.sleep(2.0)  # held, so the next warm-up task needs another worker


def packing(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import ray  # only here: the rest of the script (and r2sweep's core) runs without Ray

    on_gpu = cfg["device"] == "cuda"
    # On the CPU smoke path the tasks share cores instead of a GPU: same code, no fractional GPU.
    resources = {"num_gpus": args.gpu_fraction} if on_gpu else {"num_cpus": 0.5}
    ray.init(num_cpus=max(4, args.trials), num_gpus=1 if on_gpu else 0, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
    try:
        # Start one worker per packed trial first (torch, r2sweep and a CUDA context
        # loaded), so that the packed trials start together rather than behind
        # worker start-up, which would fake a lack of overlap.
        ray.get([ray.remote(**resources)(_warm_worker).remote(on_gpu) for _ in range(args.trials)])
        task = ray.remote(**resources)(train_trial)
        trial = (args.precision_packed, cfg["device"], cfg["width"], cfg["pack_samples"], cfg["pack_epochs"], cfg["batch"],
                 args.noise)
        # One trial alone first (it also warms Ray's worker pool and the CUDA context up).
        alone = ray.get(task.remote(*trial))
        alone_s = alone["end"] - alone["start"]
        started = time.time()
        packed = ray.get([task.remote(*trial) for _ in range(args.trials)])
        wall_s = time.time() - started
    finally:
        ray.shutdown()
    overlapped = max(t["start"] for t in packed) < min(t["end"] for t in packed)
    return {"trials": args.trials, "resources_per_trial": resources, "precision": args.precision_packed,
            "alone_s": alone_s, "packed_wall_s": wall_s, "sequential_estimate_s": args.trials * alone_s,
            "speedup_vs_sequential": args.trials * alone_s / wall_s, "all_overlapped": overlapped,
            "per_trial": [{"start_s": t["start"] - started, "end_s": t["end"] - started, "val_top1": t["val_top1"]}
                          for t in packed]}


# --- report -------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    lines = ["| precision | step ms (median) | images/s | GPU util % (mean) | val top-1 |", "|---|---|---|---|---|"]
    parity = {p["precision"]: p for p in report["parity"]}
    for s in report["step_time"]:
        util = s["gpu_utilisation"]["mean_pct"]
        top1 = parity.get(s["precision"], {}).get("val_top1")
        lines.append(f"| {s['precision']} | {s['step_ms_median']:.2f} | {s['images_per_s']:.0f} | "
                     f"{'n/a' if util is None else f'{util:.0f}'} | {'n/a' if top1 is None else f'{top1:.2f}'} |")
    pack = report.get("packing")
    if pack:
        lines += ["", "| packed trials | per trial | wall s | 4 x alone s | speed-up | all overlapped |", "|---|---|---|---|---|---|",
                  (f"| {pack['trials']} | {pack['resources_per_trial']} | {pack['packed_wall_s']:.1f} | "
                   f"{pack['sequential_estimate_s']:.1f} | {pack['speedup_vs_sequential']:.2f}x | {pack['all_overlapped']} |")]
        lines += ["", "| trial | start s | end s | val top-1 |", "|---|---|---|---|"]
        lines += [f"| {i} | {t['start_s']:.1f} | {t['end_s']:.1f} | {t['val_top1']:.2f} |" for i, t in enumerate(pack["per_trial"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (bf16 on the CPU)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (cuDNN autotune, allocator)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per precision")
    parser.add_argument("--parity-samples", type=int, default=20_000)
    parser.add_argument("--parity-epochs", type=int, default=4)
    parser.add_argument("--noise", type=float, default=12.0, help="synthetic task's noise std (prototypes: std 1)")
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--trials", type=int, default=4, help="packed trials")
    parser.add_argument("--gpu-fraction", type=float, default=0.25, help="num_gpus per packed trial")
    parser.add_argument("--precision-packed", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--pack-samples", type=int, default=25_000)
    parser.add_argument("--pack-epochs", type=int, default=6)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_trial.py: no CUDA device here; run it on a GPU machine, or pass --smoke for a tiny CPU run "
              "of the same code path", file=sys.stderr)
        return 2
    cfg = settings(args)
    precisions = [p for p in args.precisions if not (args.smoke and p == "fp16")]  # fp16 needs CUDA
    report: dict[str, Any] = {"torch": torch.__version__, "smoke": args.smoke, "settings": cfg,
                              "gpu": torch.cuda.get_device_name(0) if cfg["device"] == "cuda" else None,
                              "cudnn_benchmark": torch.backends.cudnn.benchmark, "step_time": [], "parity": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1))

    for precision in precisions:
        print(f"== step time, ResNet-18 (CIFAR stem), {precision}", flush=True)
        report["step_time"].append(step_time(precision, cfg))
        save()
    for precision in precisions:
        print(f"== accuracy parity, {cfg['parity_epochs']} epochs, {precision}", flush=True)
        report["parity"].append(train_trial(precision, cfg["device"], cfg["width"], cfg["parity_samples"],
                                            cfg["parity_epochs"], cfg["batch"], args.noise))
        save()
    if not args.skip_packing:
        print(f"== packing: {args.trials} trials at {args.gpu_fraction} GPU each", flush=True)
        report["packing"] = packing(cfg, args)
        save()
    print(table(report))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

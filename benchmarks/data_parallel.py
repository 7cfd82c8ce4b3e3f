"""One pre-training over 1, 2 and 4 data-parallel ranks: wall time, accuracy, what the all-reduce moves.

Part 1 runs the same trial (ResNet-18, CIFAR stem, on ``distorted_digits``; R2 L-inf;
global batch 64) with ``train.workers`` = 1, 2, 4 through ``run_trial`` (ranks as
local processes, gloo over the loopback), several seeds each, and records the
pre-training's wall time, its final val top-1 and the bytes each step's gradient
all-reduce handed to gloo (measured by DDP's communication hook). The machine's
cores are shared: every rank count uses the same total thread budget (``--cores``
threads split over the ranks, at least one each), so the figures say what
splitting a fixed CPU budget into ranks costs, not what more hardware buys.

Part 2 measures the all-reduce volume of the paper's ImageNet models (ResNet-18,
MobileNet-V1/V2 at 1000 classes) from one 2-rank step each, and turns it into the
time a ring all-reduce takes per step at stated link bandwidths (NVLink, PCIe,
a 100 Gb/s network): the floor a GPU step must clear for N ranks to scale.
No GPU step time is measured here (no GPU in this session): that is
``benchmarks/gpu_trial.py``'s, and RESULTS.md says what to run where one is lent.

    PYTHONPATH=. .venv/bin/python benchmarks/data_parallel.py --json benchmarks/results/data_parallel.json
    PYTHONPATH=. .venv/bin/python benchmarks/data_parallel.py --smoke   # seconds: the code path only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data_parallel import LocalPeers
from r2sweep.core.distributed import World, joined, open_store
from r2sweep.core.models import create_model
from r2sweep.core.train import _data_parallel
from r2sweep.core.trial import run_trial

# Bytes per second a ring all-reduce's bus moves per rank, as vendors state them (one direction):
# the estimate is only as good as these; DDP overlaps the all-reduce with the backward pass,
# so the exposed time per step lies between 0 and this.
LINKS = {"NVLink 4 (H100 SXM, ~450 GB/s)": 450e9, "PCIe 4.0 x16 (~25 GB/s)": 25e9,
         "100 Gb/s network (~12 GB/s)": 12.5e9}


def trial(workers: int, seed: int, epochs: int, smoke: bool) -> dict[str, Any]:
    return {"seed": seed,
            "data": {"name": "digits"} if smoke else {"name": "distorted_digits"},
            "model": {"name": "resnet18", "width": 0.125 if smoke else 0.25, "stem": "small"},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "workers": workers},
            "r2": {"kind": "linf", "strength": 0.01}, "downstream": []}


def run_one(workers: int, seed: int, epochs: int, cores: int, smoke: bool) -> dict[str, Any]:
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    config = load_trial_config(trial(workers, seed, epochs, smoke))
    peers = LocalPeers(config, threads=threads) if workers > 1 else None
    started = time.perf_counter()
    final = run_trial(config, peers=peers, device=torch.device("cpu"))
    return {"workers": workers, "seed": seed, "threads_per_rank": threads, "wall_s": time.perf_counter() - started,
            "pretrain_s": final["time/pretrain_s"], "fp_top1": final["fp/top1"],
            "bytes_per_step": final.get("comm/bytes_per_step", 0.0)}


def _one_step(rank: int, model_name: str, out: Any, ports: Any) -> None:
    """One DDP training step of rank ``rank`` (of 2): r2sweep's process group, DDP wrapping and meter, the model at
    1000 classes."""
    torch.set_num_threads(1)
    store = None
    if rank == 0:
        store, address = open_store("127.0.0.1", 2)
        ports.put(address)
    else:
        address = ports.get()
    world = World(rank, 2, address, store=store)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=1000, in_channels=3, input_size=32)
    with joined(world, torch.device("cpu")):
        wrapped = _data_parallel(model, torch.device("cpu"), world)
        world.meter.steps += 1
        torch.nn.functional.cross_entropy(wrapped(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    if rank == 0:
        out.put({**world.meter.per_step(), "parameters": sum(p.numel() for p in model.parameters())})


def zoo_volume(model: str) -> dict[str, Any]:
    """The bytes one step's all-reduce hands gloo for an ImageNet-shaped model (1000 classes), from a 2-rank step."""
    context = torch.multiprocessing.get_context("spawn")
    out, ports = context.SimpleQueue(), context.SimpleQueue()
    ranks = [context.Process(target=_one_step, args=(rank, model, out, ports)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    return {"model": model, **out.get()}


def ring_ms(bytes_per_step: float, ranks: int, bandwidth: float) -> float:
    """A ring all-reduce sends and receives 2 (N-1)/N of the buffer per rank."""
    return 1000.0 * 2 * (ranks - 1) / ranks * bytes_per_step / bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cores", type=int, default=2, help="threads shared by a run's ranks")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs, args.workers = [0], 1, [1, 2]

    runs = []
    for seed in args.seeds:  # interleaved, so drift on a shared machine hits every rank count alike
        for workers in args.workers:
            runs.append(run_one(workers, seed, args.epochs, args.cores, args.smoke))
            print(json.dumps(runs[-1]), flush=True)
    summary = []
    base = statistics.median(r["pretrain_s"] for r in runs if r["workers"] == args.workers[0])
    for workers in args.workers:
        mine = [r for r in runs if r["workers"] == workers]
        seconds = statistics.median(r["pretrain_s"] for r in mine)
        summary.append({"workers": workers, "pretrain_s": seconds, "vs_one_rank": seconds / base,
                        "top1_mean": statistics.mean(r["fp_top1"] for r in mine),
                        "top1_by_seed": [round(r["fp_top1"], 2) for r in mine],
                        "bytes_per_step": mine[0]["bytes_per_step"]})
    print("\n| ranks | pre-training s (median) | vs 1 rank | val top-1 mean | per seed | all-reduce bytes/step |")
    print("|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['workers']} | {row['pretrain_s']:.1f} | {row['vs_one_rank']:.2f} | {row['top1_mean']:.2f} | "
              f"{row['top1_by_seed']} | {row['bytes_per_step'] / 1e6:.2f} MB |")

    zoo = [zoo_volume(m) for m in (["small_cnn"] if args.smoke else ["resnet18", "mobilenet_v1", "mobilenet_v2"])]
    print("\n| model (1000 classes) | all-reduce MB/step | " + " | ".join(f"{name}: 2 / 8 ranks, ms" for name in LINKS) + " |")
    print("|---|---|" + "---|" * len(LINKS))
    for row in zoo:
        row["ring_ms"] = {name: {n: ring_ms(row["bytes_per_step"], n, bw) for n in (2, 8)} for name, bw in LINKS.items()}
        print(f"| {row['model']} | {row['bytes_per_step'] / 1e6:.1f} | " + " | ".join(
            f"{row['ring_ms'][name][2]:.2f} / {row['ring_ms'][name][8]:.2f}" for name in LINKS) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(args) | {"json": str(args.json)},
                                         "runs": runs, "summary": summary, "zoo": zoo}, indent=1, default=str))


if __name__ == "__main__":
    main()

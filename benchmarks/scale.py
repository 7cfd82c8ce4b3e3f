"""Cluster scale: what the sweep service costs per trial, from the first trial to the last.

Runs N cheap trials (a quarter-width small CNN on digits,
1 epoch, RTN W4) through the real stack: local Ray with many logical CPUs,
Optuna (TPE, or ``--sampler random`` for the service's own cost) with its study
storage on, MLflow tracking on SQLite or on an ``mlflow server`` backed by
PostgreSQL; or, with ``--bare``, the same trials through a
bare Ray Tune loop (``tune.Tuner`` calling ``run_trial``, random search, no
tracking, no checkpoints) on the same machine.

It prints, per block of 100 trials, the wall time of the block and the driver's
RSS at its end, and at the end: the wall time, the run's minimum (the trials'
own ``time/total_s`` summed over the concurrency), their ratio, the service's
overhead per trial (wall x concurrency - compute, per trial) in the first and in
the last block, and the driver's peak RSS. ``--json`` writes all of it.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --trials 1000 --tracking sqlite [--sampler random]
    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --trials 1000 --tracking postgres
    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --trials 1000 --bare
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray import tune

BLOCK = 100


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Clock(tune.Callback):
    """When each trial ended (driver time), what it computed, and the driver's RSS then."""

    def __init__(self) -> None:
        self.first_start: float | None = None
        self.ends: list[float] = []
        self.compute: list[float] = []
        self.pretrain: list[float] = []  # of compute: the pre-training (the rest: evaluation, files, RTN)
        self.rss: list[float] = []

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.first_start = self.first_start or time.perf_counter()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ends.append(time.perf_counter())
        self.compute.append(float((trial.last_result or {}).get("time/total_s", 0.0)))
        self.pretrain.append(float((trial.last_result or {}).get("time/pretrain_s", 0.0)))
        self.rss.append(_rss_mb())
        if len(self.ends) % BLOCK == 0:  # as it goes: a long run shows its trend before it ends
            start = self.ends[-BLOCK - 1] if len(self.ends) > BLOCK else (self.first_start or self.ends[0])
            print(f"trials {len(self.ends) - BLOCK + 1:>5}-{len(self.ends):<5} {self.ends[-1] - start:7.2f} s  "
                  f"compute/trial {sum(self.compute[-BLOCK:]) / BLOCK:5.3f} s (pre-training "
                  f"{sum(self.pretrain[-BLOCK:]) / BLOCK:5.3f})  driver RSS {self.rss[-1]:7.1f} MB",
                  file=sys.stderr, flush=True)


def trial_spec(trials: int, concurrency: int, sampler: str = "tpe") -> dict[str, Any]:
    return {
        "name": "scale",
        "data": {"name": "digits"},
        "model": {"name": "small_cnn", "width": 0.25},
        "train": {"epochs": 1, "batch_size": 64},
        "r2": {"kind": "linf"},
        "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
        "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
        "search": {"train.lr": {"loguniform": [0.01, 0.1]}, "r2.strength": {"loguniform": [1e-4, 1e-1]}},
        "sweep": {"num_samples": trials, "max_concurrent": concurrency, "scheduler": "none", "seed": 0, "sampler": sampler,
                  "resources_per_trial": {"cpu": 1}, "pretrain_cache": False},
    }


@contextlib.contextmanager
def mlflow_on_postgres(root: Path) -> Iterator[str]:
    """A team's tracking server: ``mlflow server`` on a fresh PostgreSQL (the suite's own helpers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import serve_mlflow
    from test_tracking_postgres import create_database, postgres_server

    root.mkdir(parents=True)
    with postgres_server() as server, serve_mlflow(root, create_database(server, "mlflow")) as url:
        yield url


def run_r2sweep(args: argparse.Namespace, tmp: Path, clock: Clock) -> float:
    import r2sweep

    with (mlflow_on_postgres(tmp / "server") if args.tracking == "postgres"
          else contextlib.nullcontext(f"sqlite:///{tmp / 'mlflow.db'}")) as uri:
        started = time.perf_counter()
        r2sweep.run_sweep(trial_spec(args.trials, args.concurrency, args.sampler), tracking_uri=uri, storage=tmp / "results",
                          num_cpus=args.num_cpus, callbacks=[clock], progress=False, register=False)
        return time.perf_counter() - started


def bare_trainable(config: dict[str, Any]) -> None:
    """What a user writes by hand: the trial's function, its metrics to Tune, nothing else."""
    import torch

    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.trial import run_trial

    torch.set_num_threads(1)
    spec = trial_spec(0, 0)
    spec["train"] = {**spec["train"], "lr": config["lr"]}
    spec["r2"] = {**spec["r2"], "strength": config["strength"]}
    trial = load_trial_config({k: spec[k] for k in ("data", "model", "train", "r2", "downstream")})
    run_trial(trial, lambda metrics: tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))


def run_bare(args: argparse.Namespace, tmp: Path, clock: Clock) -> float:
    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        tune.Tuner(
            tune.with_resources(bare_trainable, {"cpu": 1}),
            param_space={"lr": tune.loguniform(0.01, 0.1), "strength": tune.loguniform(1e-4, 1e-1)},
            tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=args.concurrency,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="bare", storage_path=str(tmp / "results"), callbacks=[clock], verbose=0),
        ).fit()
        return time.perf_counter() - started
    finally:
        ray.shutdown()


def summarize(args: argparse.Namespace, clock: Clock, wall: float) -> dict[str, Any]:
    n = len(clock.ends)
    start = clock.first_start or clock.ends[0]
    bounds = [start] + clock.ends[BLOCK - 1::BLOCK]
    blocks = [round(b - a, 2) for a, b in zip(bounds, bounds[1:])]
    block_compute = [sum(clock.compute[i:i + BLOCK]) for i in range(0, BLOCK * len(blocks), BLOCK)]
    # What the service adds per trial in a block: the block's slot-seconds less what its trials computed.
    overhead = [round((b * args.concurrency - c) / BLOCK, 3) for b, c in zip(blocks, block_compute)]
    minimum = sum(clock.compute) / args.concurrency
    return {
        "mode": "bare" if args.bare else args.tracking, "sampler": "random" if args.bare else args.sampler,
        "trials": args.trials, "finished": n,
        "concurrency": args.concurrency, "num_cpus": args.num_cpus, "wall_s": round(wall, 1),
        "from_first_start_s": round(clock.ends[-1] - start, 1) if n else None,
        "minimum_s": round(minimum, 1), "ratio": round((clock.ends[-1] - start) / minimum, 3) if n else None,
        "trial_compute_mean_s": round(sum(clock.compute) / max(1, n), 3),
        "block_s": blocks, "overhead_per_trial_s": overhead,
        "compute_per_trial_s": [round(c / BLOCK, 3) for c in block_compute],
        "pretrain_per_trial_s": [round(sum(clock.pretrain[i:i + BLOCK]) / BLOCK, 3)
                                 for i in range(0, BLOCK * len(blocks), BLOCK)],
        "last_over_first_block": round(blocks[-1] / blocks[0], 3) if len(blocks) > 1 else None,
        "driver_rss_mb": [round(clock.rss[i], 1) for i in range(BLOCK - 1, n, BLOCK)],
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=16, help="logical CPUs of the local Ray")
    parser.add_argument("--tracking", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe",
                        help="random: the service's own cost, without TPE's (which grows with the history by design)")
    parser.add_argument("--bare", action="store_true", help="a bare Ray Tune loop instead of r2sweep (random search)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="r2sweep-scale-") as tmp:
        wall = (run_bare if args.bare else run_r2sweep)(args, Path(tmp), clock)
    figures = summarize(args, clock, wall)
    for i, (seconds, over) in enumerate(zip(figures["block_s"], figures["overhead_per_trial_s"])):
        rss = figures["driver_rss_mb"][i] if i < len(figures["driver_rss_mb"]) else float("nan")
        print(f"trials {i * BLOCK + 1:>5}-{(i + 1) * BLOCK:<5} {seconds:7.2f} s  overhead/trial {over:6.3f} s  "
              f"driver RSS {rss:7.1f} MB", flush=True)
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, list)}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweep overhead: wall time of a sweep over the time its trials computed, per slot.

16 trials of about 20 s (small CNN on digits; the epoch count sets the length),
2 at a time, one CPU each, no early stopping, MLflow tracking into a fresh SQLite
store. The ideal wall time is the trials' own compute (``time/total_s`` that
``run_trial`` measures) divided by the concurrency; the ratio says what Ray,
Optuna, MLflow and checkpointing add. Two ratios are reported: from the call to
``r2sweep.run_sweep`` (Ray's start-up and the selection of the best trial included) and from the first trial's start.

    .venv/bin/python benchmarks/sweep_overhead.py --trials 16 --epochs 40
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from sweep_timing import FirstTrialStart

import r2sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40, help="pre-training epochs per trial (sets its length)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spec = (
        {
            "name": "overhead",
            "data": {"name": "digits"},
            "model": {"name": "small_cnn", "width": 0.5},
            "train": {"epochs": args.epochs},
            "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
            "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
            "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
            "sweep": {"num_samples": args.trials, "max_concurrent": args.concurrency, "scheduler": "none",
                      "resources_per_trial": {"cpu": 1}},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        first = FirstTrialStart()
        started = time.perf_counter()
        # The product's own path (tracking, selection) with the champion's registration left out.
        result = r2sweep.run_sweep(spec, tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                                   storage=Path(tmp) / "results", num_cpus=args.concurrency, callbacks=[first],
                                   progress=False, register=False)
        wall = time.perf_counter() - started
    compute = [r.metrics["time/total_s"] for r in result.tune_results if r.metrics and "time/total_s" in r.metrics]
    ideal = sum(compute) / args.concurrency
    from_first = wall - ((first.first or started) - started)
    print(f"trials finished: {len(compute)}/{args.trials}; trial compute: mean {sum(compute) / len(compute):.1f} s, "
          f"sum {sum(compute):.1f} s; ideal wall at concurrency {args.concurrency}: {ideal:.1f} s")
    print(f"sweep wall: {wall:.1f} s -> ratio {wall / ideal:.3f} (including Ray start-up); "
          f"from the first trial's start: {from_first:.1f} s -> ratio {from_first / ideal:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

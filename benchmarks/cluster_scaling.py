"""Scale-out: trials per hour on 2 simulated nodes of one CPU each against 1 such node.

``ray.cluster_utils.Cluster`` starts a head with no CPUs (it runs only the
driver: Tune, Optuna, the MLflow callback) and N worker nodes of one CPU each,
in this one machine. The same sweep runs on each cluster: the same trials (a
seeded random sampler, so identical configurations), one CPU per trial (the
trainable limits torch to its share), as many at a time as there are workers,
MLflow tracking into a fresh SQLite store. Throughput is measured from the first
trial's start to the sweep's end, so cluster start-up is excluded (it is
printed separately).

    .venv/bin/python benchmarks/cluster_scaling.py --trials 8    # the quickstart's trials

Trials should have epochs of a second or more, as real ones do: each epoch's
report carries a checkpoint that the driver registers, and with epochs of a few
milliseconds (tiny models) that driver work, on the same two cores as the
trials, is what the benchmark would measure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from sweep_timing import FirstTrialStart

import r2sweep
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.tune.tuner import ExperimentOutcome


def run_on(nodes: int, trials: int, epochs: int, model: dict) -> dict:
    data = {
        "name": f"scaling-{nodes}",
        "data": {"name": "digits"},
        "model": model,
        "train": {"epochs": epochs},
        "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
        "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
        "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
        "sweep": {"num_samples": trials, "max_concurrent": nodes, "sampler": "random", "seed": 0,
                  "scheduler": "none", "resources_per_trial": {"cpu": 1}},
    }
    spec = load_sweep_spec(data)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ready = time.perf_counter()
        try:
            first = FirstTrialStart()
            result = r2sweep.run_sweep(data, tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                                       storage=Path(tmp) / "results", callbacks=[first], progress=False, register=False)
            ended = time.perf_counter()
            outcome = ExperimentOutcome(spec.name, result.path, result.tune_results, spec)
        finally:
            ray.shutdown()
            cluster.shutdown()
    finished = outcome.finished()
    compute = [r.metrics["time/total_s"] for r in finished]
    span = ended - (first.first or ready)
    return {"nodes": nodes, "finished": len(finished), "startup_s": ready - started, "span_s": span,
            "trials_per_hour": 3600 * len(finished) / span, "trial_compute_mean_s": sum(compute) / len(compute),
            "configs": sorted(round(r.config["train.lr"], 6) for r in finished)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15, help="pre-training epochs per trial (sets its length)")
    parser.add_argument("--model", default="mobilenet_v2", help="the quickstart's model by default")
    parser.add_argument("--width", type=float, default=0.25)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model = {"name": args.model, "width": args.width}
    one = run_on(1, args.trials, args.epochs, model)
    two = run_on(2, args.trials, args.epochs, model)
    assert one["configs"] == two["configs"], "both clusters must run the same trials"
    for r in (one, two):
        print(f"{r['nodes']} node(s): {r['finished']} trials in {r['span_s']:.1f} s from the first trial's start "
              f"(cluster start-up {r['startup_s']:.1f} s); {r['trials_per_hour']:.0f} trials/hour; "
              f"mean trial compute {r['trial_compute_mean_s']:.1f} s")
    print(f"speed-up, 2 nodes over 1: {two['trials_per_hour'] / one['trials_per_hour']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

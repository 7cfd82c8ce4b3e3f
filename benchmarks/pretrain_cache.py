"""The pre-training cache: a sweep over downstream knobs, and the quickstart, with the cache on and off.

Part ``downstream``: ``--trials`` trials (default 16) of MobileNet-V2 (width 0.25) on digits,
the quickstart's pre-training, searching AdaRound's iterations and regularisation only.
Cache off, every trial pre-trains; cache on, one does. Reported: both wall times, their
ratio, and the cache-on wall time against the cost it cannot avoid (one pre-training plus
every trial's downstream phase, from the trials' own ``time/pretrain_s`` and
``time/<result>_s``; the goal is at most 1.15x).

Part ``quickstart``: ``search_spaces/quickstart.yaml`` as ``make sweep`` runs it, cache
off, then cache on into an empty cache (what storing costs), then the same sweep again
under a new name (what a re-run saves: every trial whose configuration was run before
is a hit).

    .venv/bin/python benchmarks/pretrain_cache.py                 # both parts, ~25 min on 2 cores
    .venv/bin/python benchmarks/pretrain_cache.py --part downstream --trials 8

Each sweep runs on one fresh local Ray; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import r2sweep  # noqa: E402

QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"


def downstream_spec(trials: int) -> dict:
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(
        name="cache-downstream",
        r2={"kind": "linf", "strength": 0.01},
        downstream=[{"method": "ptq", "algorithm": "adaround", "weight_bits": [4], "act_bits": 8,
                     "granularity": "tensor", "range": "mse", "bn_reestimate": True, "adaround_iters": 100}],
        objective={"metric": "ptq_adaround_w4a8/top1", "mode": "max"},
        search={"downstream.0.adaround_iters": {"int": [20, 200]},
                "downstream.0.adaround_lambda": {"loguniform": [1.0e-3, 1.0e-1]}},
    )
    spec["sweep"] = {**spec["sweep"], "num_samples": trials, "scheduler": "none", "sampler": "random"}
    return spec


def run(spec: dict, root: Path, name: str, cache: bool | str) -> dict:
    """One sweep on a fresh local Ray: wall time and every trial's figures."""
    spec = {**spec, "sweep": {**spec["sweep"], "pretrain_cache": cache}}
    root.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        result = r2sweep.run_sweep(spec, name=name, tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                                   storage=root / "results", progress=False, register=False)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    trials = result.trials
    columns = [c for c in trials.columns if c.startswith("time/") or c in ("outcome", "pretrain_cache")]
    rows = trials[columns].to_dict("records")
    print(f"{name}: {wall:.1f}s wall, {len(rows)} trials", flush=True)
    return {"name": name, "wall_s": wall, "trials": rows}


def downstream_part(trials: int, root: Path) -> dict:
    spec = downstream_spec(trials)
    off = run(spec, root, "downstream-off", False)
    on = run(spec, root, "downstream-on", True)
    result_time = "time/ptq_adaround_w4a8_s"
    unavoidable = (max(t["time/pretrain_s"] for t in on["trials"])  # the one trial that trained
                   + sum(t[result_time] for t in on["trials"]))
    figures = {
        "off_wall_s": off["wall_s"], "on_wall_s": on["wall_s"], "off_over_on": off["wall_s"] / on["wall_s"],
        "one_pretrain_s": max(t["time/pretrain_s"] for t in on["trials"]),
        "downstream_sum_s": sum(t[result_time] for t in on["trials"]),
        "on_over_unavoidable": on["wall_s"] / unavoidable,
        "cache_on": sorted(t["pretrain_cache"] for t in on["trials"]),
    }
    return {"figures": figures, "sweeps": [off, on]}


def quickstart_part(root: Path) -> dict:
    spec = yaml.safe_load(QUICKSTART.read_text())
    off = run(spec, root, "quickstart-off", False)
    cold = run(spec, root, "quickstart-cold", True)
    warm = run(spec, root, "quickstart-warm", True)
    figures = {"off_wall_s": off["wall_s"], "cold_wall_s": cold["wall_s"], "warm_wall_s": warm["wall_s"],
               "cold_over_off": cold["wall_s"] / off["wall_s"], "warm_over_off": warm["wall_s"] / off["wall_s"],
               "warm_cache": sorted(t["pretrain_cache"] for t in warm["trials"])}
    return {"figures": figures, "sweeps": [off, cold, warm]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("downstream", "quickstart", "all"), default="all")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pretrain_cache.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    report: dict = {"command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="r2cache-bench-") as folder:
        root = Path(folder)
        if args.part in ("downstream", "all"):
            report["downstream"] = downstream_part(args.trials, root / "downstream")
            print(json.dumps(report["downstream"]["figures"], indent=1), flush=True)
        if args.part in ("quickstart", "all"):
            report["quickstart"] = quickstart_part(root / "quickstart")
            print(json.dumps(report["quickstart"]["figures"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one trial costs, phase by phase, over many trials in one process (a reused Tune worker).

Runs ``benchmarks/scale.py``'s cheap trial (a quarter-width small CNN on digits, 1 epoch,
RTN W4) N times in this process, each with an output folder as a sweep's trials have,
and prints per block of 50 trials the mean trial time (``time/total_s``) and the time of
each phase: the pre-training, evaluation, ``pretrained.pt``, the weight-histogram PNG,
the ``torch.export`` archive (the champion's format) and the downstream result's
weights; with the process's live Python objects (after a collection) and its RSS. A
phase whose time grows with the block number would be a worker that slows down as it
is reused. One thread:

    PYTHONPATH=. .venv/bin/python benchmarks/trial_phases.py --trials 400 [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import r2sweep.core.trial as trial_module
from r2sweep.core.config.trial import load_trial_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import trial_spec  # noqa: E402

BLOCK = 50
#: The functions core/trial.py calls for each phase, timed where it calls them.
PHASES = ("run_pretraining", "evaluate", "save_pretrained", "weight_histograms", "export_archive", "save_atomic")


def _timed(name: str, function: Callable[..., Any], spent: dict[str, float]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
    return wrapper


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spent: dict[str, float] = {}
    for name in PHASES:
        setattr(trial_module, name, _timed(name, getattr(trial_module, name), spent))
    spec = trial_spec(0, 0)
    config = load_trial_config({k: spec[k] for k in ("data", "model", "train", "r2", "downstream")})
    blocks, total = [], 0.0
    for number in range(1, args.trials + 1):
        with tempfile.TemporaryDirectory(prefix="r2sweep-phases-") as out:
            total += trial_module.run_trial(config, out_dir=Path(out), progress=lambda line: None)["time/total_s"]
        if number % BLOCK == 0:
            gc.collect()
            block = {"trials": number, "trial_s": round(total / BLOCK, 3),
                     **{name: round(spent.get(name, 0.0) / BLOCK, 3) for name in PHASES},
                     "python_objects": len(gc.get_objects()), "rss_mb": round(_rss_mb(), 1)}
            blocks.append(block)
            print(json.dumps(block), flush=True)
            total = 0.0
            spent.clear()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"block": BLOCK, "blocks": blocks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What choosing the next trial costs the driver per step, with N trials in the sweep.

Tune's FIFO scheduler (ASHA inherits it) scans every trial for a PENDING one at every
step of the driver's loop; r2sweep's ``LiveTrialsFIFO`` looks only at the trials not
ended. N trials of which all but two (running) have ended, as in a long sweep; the time
of one ``choose_trial_to_run``, averaged over 2,000 calls, both schedulers in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/scheduler_scan.py --trials 1000 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from r2sweep.tune.search import LiveTrialsFIFO


def per_call_us(scheduler, controller, calls: int = 2000) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        scheduler.choose_trial_to_run(controller)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    for n in args.trials:
        trials = [SimpleNamespace(trial_id=str(i), status=Trial.TERMINATED if i < n - 2 else Trial.RUNNING)
                  for i in range(n)]
        controller = SimpleNamespace(get_trials=lambda: trials)
        live = LiveTrialsFIFO()
        for trial in trials:
            live.on_trial_add(controller, trial)
            if trial.status == Trial.TERMINATED:
                live.on_trial_complete(controller, trial, {})
        fifo = per_call_us(FIFOScheduler(), controller)
        ours = per_call_us(live, controller)
        print(f"{n:>6} trials: Tune's FIFO {fifo:9.1f} us per step, LiveTrialsFIFO {ours:6.1f} us ({fifo / ours:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

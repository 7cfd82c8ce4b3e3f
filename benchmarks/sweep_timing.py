"""Shared by the sweep benchmarks: when the first trial of a sweep started."""

from __future__ import annotations

import time

from ray import tune


class FirstTrialStart(tune.Callback):
    """Records ``time.perf_counter()`` at the first trial's start, so cluster and
    Ray start-up can be left out of a throughput figure."""

    def __init__(self) -> None:
        self.first: float | None = None

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.first = self.first or time.perf_counter()

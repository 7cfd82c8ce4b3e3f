"""Each trial keeps its two newest Tune checkpoints: pruned here, one delete per checkpoint.

Tune's ``CheckpointConfig(num_to_keep=N)`` prunes too, but it also forces an
experiment snapshot (every trial's state written as JSON, the searcher pickled,
the folder synced to the storage) whenever a trial has checkpointed N times since
the last snapshot. A trial checkpoints every epoch and at its end, so with short
trials that is a snapshot per trial, each costing O(trials so far): the driver's
cost per trial grew with the sweep (issue 42, ``benchmarks/scale.py``: blocks of
100 trials from 39 s to 55 s over 1,000 trials). Pruned here, a checkpoint costs
one delete, and snapshots keep Tune's own pace (at most 5% of the driver's time).

A snapshot can then name a checkpoint deleted since; on resume
:mod:`r2sweep.tune.state_repairs` copies the trial's newest checkpoint under that
name, as it did for Tune's own pruning. A resumed driver prunes only what it saw
checkpointed: a restored trial's older checkpoints stay until the sweep is deleted.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ray import tune

__all__ = ["KeepNewestCheckpoints", "CHECKPOINTS_KEPT"]

#: Two, not one: a snapshot taken between two checkpoints names the older one more often than not.
CHECKPOINTS_KEPT = 2


class KeepNewestCheckpoints(tune.Callback):
    """Deletes a trial's checkpoints but the newest ``keep`` as Tune registers new ones."""

    def __init__(self, keep: int = CHECKPOINTS_KEPT) -> None:
        self.keep = keep
        self._kept: dict[str, deque[Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_kept": {}}  # pickled with Tune's experiment: paths are this driver's

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        kept = self._kept.setdefault(trial.trial_id, deque())
        kept.append(checkpoint)
        while len(kept) > self.keep:
            old = kept.popleft()
            try:
                old.filesystem.delete_dir(old.path)
            except OSError:  # gone already, or the storage refused: a leftover, not a failure of the sweep
                pass

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._kept.pop(trial.trial_id, None)  # its newest checkpoints stay; nothing more to prune

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._kept.pop(trial.trial_id, None)

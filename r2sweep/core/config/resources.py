"""``sweep.resources_per_trial``: what Ray reserves per trial, and the data-parallel ranks it implies.

``cpu``, ``gpu`` and custom resources are per rank; ``workers`` is the number of
ranks (``train.workers`` in every trial), ``placement`` where Ray puts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from r2sweep.core.config.search import mapping_at
from r2sweep.core.config.trial import TrialConfig, load_trial_config
from r2sweep.core.validate import check, is_number

__all__ = ["PLACEMENTS", "check_resources_per_trial", "workers_from_resources"]

#: Where a trial's ranks go (Ray's soft placement strategies: a rank goes elsewhere when its node is full).
PLACEMENTS = {"pack": "pack: on as few nodes as fit them (the fastest all-reduce)",
              "spread": "spread: on as many nodes as they can (one node lost costs the fewest ranks)"}


def check_resources_per_trial(value: Any) -> None:
    """Raises ConfigError naming the first bad ``sweep.resources_per_trial`` entry."""
    resources = mapping_at(value, "sweep.resources_per_trial", "{cpu: 1, gpu: 0.5}")
    for key, amount in resources.items():
        where = f"sweep.resources_per_trial.{key}"
        check(isinstance(key, str), where, amount, "a resource name (cpu, gpu or a custom one)")
        if key == "workers":
            check(isinstance(amount, int) and not isinstance(amount, bool) and amount >= 1, where, amount,
                  "an integer >= 1: the data-parallel ranks of each trial's pre-training (cpu, gpu: per rank)")
        elif key == "placement":
            check(amount in PLACEMENTS, where, amount, f"one of {list(PLACEMENTS)}: {PLACEMENTS['pack']}; "
                  f"{PLACEMENTS['spread']}")
        else:
            check(is_number(amount) and amount >= 0 and math.isfinite(amount), where, amount, "a number >= 0")
    check(resources.get("cpu", 1) > 0, "sweep.resources_per_trial.cpu", resources.get("cpu"), "a number > 0")
    gpu, workers = resources.get("gpu", 0), resources.get("workers", 1)
    check(gpu <= 1 or float(gpu).is_integer(), "sweep.resources_per_trial.gpu", gpu,
          "a fraction of one GPU (0-1) or a whole number of GPUs")
    # NCCL refuses two ranks of one group on one GPU, which fractions would allow.
    check(workers == 1 or gpu == 0 or float(gpu).is_integer(), "sweep.resources_per_trial.gpu", gpu,
          f"a whole number of GPUs per rank with workers: {workers} (NCCL cannot put two ranks on one GPU)")


def workers_from_resources(base: dict[str, Any], trial: TrialConfig, resources: Mapping[str, Any]
                           ) -> tuple[dict[str, Any], TrialConfig]:
    """``sweep.resources_per_trial.workers`` written into every trial as ``train.workers``: Ray reserves the
    ranks, the trial runs them, and the two must agree. A base that says otherwise is refused."""
    if "workers" not in resources:
        check(trial.train.workers == 1, "train.workers", trial.train.workers,
              f"set in the sweep as sweep.resources_per_trial.workers: {trial.train.workers} (Ray reserves each "
              "rank's cpu/gpu there), not in train")
        return base, trial
    written = (base.get("train") or {}).get("workers") if isinstance(base.get("train"), Mapping) else None
    check(written is None or written == resources["workers"], "train.workers", written,
          f"left out, or equal to sweep.resources_per_trial.workers ({resources['workers']}), which decides it")
    base = {**base, "train": {**dict(base.get("train") or {}), "workers": resources["workers"]}}
    return base, load_trial_config(base)

"""Data-parallel trials on Ray: Tune reserves every rank, the trial runs ranks 1..N-1 in that reservation.

A trial with ``sweep.resources_per_trial.workers: N`` asks Tune for a placement
group of N bundles, each with the per-rank ``cpu``/``gpu``. Tune starts the trial
(rank 0) in bundle 0 only when the whole group is reserved, so concurrent trials
never hold more than the cluster has, and ``max_concurrent`` above what fits just
queues. The trial starts ranks 1..N-1 as Ray tasks pinned to bundles 1..N-1.

Why not Ray Train's ``TorchTrainer`` inside the trial: Ray Train V2 reserves its
workers in a placement group of its own, outside the trial's (ray-project/ray
#54305; in Ray 2.60, ``WorkerGroup._create_placement_group``), so Tune could not
count them and concurrent trials would contend for the same CPUs and GPUs. The
process group, DDP and the training loop are the same either way
(:mod:`r2sweep.core.distributed`).

A lost rank (its node gone) fails the trial's next all-reduce; the trial then
fails as a whole, and Tune restarts it from its last checkpoint in a new placement
group on what the cluster still has, exactly as a one-process trial that lost its node.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ray
from ray import tune
from ray.exceptions import RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from r2sweep.core.config.sweep import SweepSettings
from r2sweep.core.config.trial import TrialConfig
from r2sweep.core.data_parallel import RANK_EXIT_S, PeerFailed, run_peer
from r2sweep.core.factories import install_callables

__all__ = ["trial_resources", "RayPeers", "ray_peers", "ray_bundle", "task_placement"]

# Ray's names for the two resources the spec spells in lower case.
_RAY_NAMES = {"cpu": "CPU", "gpu": "GPU"}


def ray_bundle(resources: Mapping[str, float]) -> dict[str, float]:
    """Per-rank resources in Ray's spelling (``CPU``, ``GPU``, custom names as they are)."""
    return {_RAY_NAMES.get(k, k): float(v) for k, v in resources.items() if float(v) > 0}


def trial_resources(settings: SweepSettings) -> dict[str, float] | tune.PlacementGroupFactory:
    """What Tune reserves for one trial: its resources, or N bundles (bundle 0 is the trial itself)."""
    if settings.workers == 1:
        return settings.rank_resources
    return tune.PlacementGroupFactory([ray_bundle(settings.rank_resources)] * settings.workers,
                                      strategy=settings.placement.upper())


def task_placement(settings: SweepSettings) -> tuple[dict[str, Any], Any]:
    """Ray task options for one trial run outside Tune (a confirmation re-run), and its placement group or None.

    One rank: the rank's resources. N ranks: a placement group of N bundles, the task in
    bundle 0 and its rank tasks captured into the group, so re-runs queue for whole trials
    as Tune's trials do. The caller removes the group once the task ended.
    """
    resources = settings.rank_resources
    options: dict[str, Any] = {"num_cpus": resources.get("cpu", 1), "num_gpus": resources.get("gpu", 0)}
    if settings.workers == 1:
        return options, None
    group = ray.util.placement_group([ray_bundle(resources)] * settings.workers, strategy=settings.placement.upper())
    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
    return options, group


@ray.remote(max_retries=0)
def _rank(config: Mapping[str, Any], rank: int, address: str, threads: int,
          callables: Mapping[str, Any]) -> dict[str, Any]:
    install_callables(dict(callables))
    result = run_peer(config, rank, address, threads)
    return {**result, "node_id": ray.get_runtime_context().get_node_id()}


def ray_peers(trial: TrialConfig, resources: Mapping[str, float],
              callables: Mapping[str, Any] | None = None) -> RayPeers | None:
    """Ranks 1..N-1 of ``trial`` in its placement group (each with ``resources``), or None for one rank."""
    return RayPeers(trial, resources, callables) if trial.train.workers > 1 else None


class RayPeers:
    """Ranks 1..N-1 as Ray tasks in bundles 1..N-1 of the calling trial's placement group."""

    def __init__(self, trial: TrialConfig, resources: Mapping[str, float],
                 callables: Mapping[str, Any] | None = None) -> None:
        self.config = trial.to_mapping()
        self.workers = trial.train.workers
        self.resources = dict(resources)
        self.callables = dict(callables or {})
        self.host = ray.util.get_node_ip_address()

    @contextmanager
    def run(self, address: str) -> Iterator[list[dict[str, Any]]]:
        group = ray.util.get_current_placement_group()
        if group is None:
            raise PeerFailed("a data-parallel trial runs inside its placement group (Tune's, or run_reruns'); "
                             "this one has none")
        threads = int(max(1, self.resources.get("cpu", 1)))
        tasks = [_rank.options(num_cpus=self.resources.get("cpu", 1), num_gpus=self.resources.get("gpu", 0),
                               resources={k: v for k, v in self.resources.items() if k not in ("cpu", "gpu")},
                               scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank))
                 .remote(self.config, rank, address, threads, self.callables)
                 for rank in range(1, self.workers)]
        results: list[dict[str, Any]] = []
        try:
            yield results
        except BaseException:
            for task in tasks:
                ray.cancel(task, force=True)
            raise
        try:
            results.extend(ray.get(tasks, timeout=RANK_EXIT_S))
        except (RayError, TimeoutError) as error:
            for task in tasks:
                ray.cancel(task, force=True)
            raise PeerFailed(f"a rank of this trial's pre-training failed: {str(error).splitlines()[0][:300]}") from None

"""Joining Ray and checking, before any trial starts, that the cluster can run the sweep.

Tune itself would wait forever for resources no node has, and a trial on a node
without the dataset fails only after Ray scheduled it; both are cheaper to
catch here, with a message that says what to change.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from r2sweep.core.errors import ConfigError
from r2sweep.tune.ray_address import reach_ray
from r2sweep.tune.data_parallel import ray_bundle
from r2sweep.tune.ray_temp import local_temp_dir

__all__ = ["connect", "check_resources", "check_data_roots", "trial_nodes", "ClusterError", "SKIP_RESOURCE_CHECK"]

#: Set to 1 on autoscaling clusters, where nodes that fit may appear later.
SKIP_RESOURCE_CHECK = "R2SWEEP_SKIP_RESOURCE_CHECK"


class ClusterError(ConfigError):
    """The sweep asks for something the Ray cluster cannot give (a bad-input error: exit 2)."""


def connect(address: str | None, num_cpus: int | None, runtime_env: Mapping[str, Any] | None = None) -> None:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``), or start a local Ray, with ``runtime_env``
    for every worker of the job (a Ray the caller already started keeps its own: the import check then
    says whether the user's code reached the workers)."""
    if ray.is_initialized():
        return
    env = dict(runtime_env) if runtime_env else None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # Ray retries an address nobody answers at for minutes; this fails in seconds
        # (ClusterUnreachable, naming the address and the fix; a malformed one: OptionError).
        reach_ray(address)
        ray.init(address=address, log_to_driver=False, runtime_env=env)
    else:
        # "local": a new Ray of our own, never a cluster some earlier `ray start`
        # left in Ray's address file; its temp folder short enough for Ray's sockets.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _temp_dir=local_temp_dir(), runtime_env=env)


def _alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _describe(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def check_resources(resources: Mapping[str, float], workers: int = 1) -> None:
    """Fail unless the alive nodes can hold one trial's whole request.

    Each rank's resources form one bundle, so they must all fit on a single node:
    two nodes with one GPU each cannot run a rank that asks for two. A trial of
    ``workers`` ranks needs that many bundles at once, on any nodes.

    Raises:
        ClusterError: naming ``sweep.resources_per_trial``, the request and the
            largest node (or the cluster's count of bundles), and what to change.
    """
    if os.environ.get(SKIP_RESOURCE_CHECK) == "1":
        return
    wanted = ray_bundle(resources)
    nodes = _alive_nodes()
    fits = [_bundles_on(node.get("Resources", {}), wanted) for node in nodes]
    if sum(fits) >= workers:
        return
    if any(fits):
        raise ClusterError(
            "sweep.resources_per_trial",
            _describe({**resources, "workers": workers}),
            f"ranks that this cluster can hold at once: its {len(nodes)} node(s) hold {sum(fits)} rank(s) of "
            f"{_describe(resources)}. Lower workers or the per-rank request, or add nodes "
            f"(on an autoscaling cluster set {SKIP_RESOURCE_CHECK}=1)",
        )
    largest = max(nodes, key=lambda n: tuple(n.get("Resources", {}).get(k, 0.0) for k in wanted), default=None)
    resources = {k: v for k, v in resources.items() if float(v) > 0}
    offered = {k: (largest or {}).get("Resources", {}).get(k, 0.0) for k in wanted}
    raise ClusterError(
        "sweep.resources_per_trial",
        _describe(resources),
        f"a request that one node can hold; the largest of this cluster's {len(nodes)} node(s) has "
        f"{_describe(offered)}. Lower the request, or add a node with those resources "
        f"(on an autoscaling cluster set {SKIP_RESOURCE_CHECK}=1)",
    )


def _bundles_on(have: Mapping[str, float], wanted: Mapping[str, float]) -> int:
    """How many bundles of ``wanted`` one node's ``have`` holds (many, for a bundle of nothing)."""
    counts = [int(have.get(name, 0.0) // amount) for name, amount in wanted.items()]
    return min(counts, default=1_000_000)


@ray.remote(num_cpus=0)
def _missing(paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not Path(p).exists()]


def trial_nodes() -> list[dict]:
    """The alive nodes that can run a trial."""
    return _worker_nodes(_alive_nodes())


def _worker_nodes(nodes: Iterable[dict]) -> list[dict]:
    """Nodes that can run a trial (any CPU); the head of a cluster often has none."""
    return [n for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0]


def check_data_roots(roots: Sequence[str], field: str = "data.root") -> None:
    """Fail unless every path in ``roots`` exists on every node that can run a trial.

    Trials read ``data.root`` (and ``model.init_from``) where they run, not where the
    driver runs: on a cluster the path must be mounted on each worker.

    Raises:
        ClusterError: naming ``field``, the missing path and the nodes.
    """
    roots = sorted(set(roots))
    if not roots:
        return
    nodes = _worker_nodes(_alive_nodes())
    probes = {
        node["NodeID"]: _missing.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(roots)
        for node in nodes
    }
    absent: dict[str, list[str]] = {}
    for node_id, missing in zip(probes, ray.get(list(probes.values()))):
        for root in missing:
            absent.setdefault(root, []).append(node_id[:8])
    if absent:
        root, where = next(iter(sorted(absent.items())))
        raise ClusterError(
            field,
            root,
            f"a path that exists on every Ray node that runs trials; it is missing on "
            f"{len(where)} of {len(nodes)} (node {', '.join(where)}). Mount it there, or fix the path",
        )

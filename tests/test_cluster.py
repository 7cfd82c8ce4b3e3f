"""The sweep on a multi-node Ray cluster in one machine (``ray.cluster_utils.Cluster``).

A head with no CPUs (it runs only the driver's side) and two worker nodes of one
CPU each, both offering a custom ``r2sweep_slot`` resource that every trial asks
for: trials can only run on the workers, and with two at a time they must use
both. MLflow (a real SQLite store) must hold every trial, tagged with its node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray
from conftest import new_mlflow_store
from ray.cluster_utils import Cluster

import r2sweep
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.errors import ConfigError
from r2sweep.tracking.store import TAG_ROLE, TAG_TRIAL_ID, Tracker
from r2sweep.tune.callbacks import TAG_NODE_ID
from r2sweep.tune.cluster import ClusterError
from r2sweep.tune.tuner import ExperimentOutcome, run_experiment
from user_code import MODULE, write_user_module

pytestmark = pytest.mark.ray

SPEC = {
    "name": "on-cluster",
    "data": {"name": "synthetic", "num_samples": 128},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "batch_size": 32},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "scheduler": "none",
              "resources_per_trial": {"cpu": 1, "r2sweep_slot": 1}},
}


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    # Ray's session files go to the suite's short RAY_TMPDIR (conftest): a folder
    # under tmp_path can be too long for Ray's socket paths.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"r2sweep_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, [w.node_id for w in workers], cluster.head_node.node_id
    ray.shutdown()
    cluster.shutdown()


def test_trials_run_on_both_workers_and_all_reach_mlflow(cluster, tmp_path: Path) -> None:
    _, worker_ids, head_id = cluster
    spec = load_sweep_spec(SPEC)
    tracker = Tracker(new_mlflow_store(tmp_path / "mlflow.db"))
    result = r2sweep.run_sweep(SPEC, tracking_uri=tracker.tracking_uri, storage=tmp_path / "results",
                               progress=False, register=False)
    outcome = ExperimentOutcome(spec.name, result.path, result.tune_results, spec)

    assert len(outcome.finished()) == 4 and (result.trials["outcome"] == "finished").sum() == 4
    runs = tracker.client.search_runs(
        [tracker.client.get_experiment_by_name(spec.name).experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'trial'",
    )
    assert len(runs) == 4
    assert {r.data.tags[TAG_TRIAL_ID] for r in runs} == {r.metrics["trial_id"] for r in outcome.results}
    assert all(r.info.status == "FINISHED" for r in runs)
    nodes = [r.data.tags[TAG_NODE_ID] for r in runs]
    assert set(nodes) == set(worker_ids), "every trial ran on a worker, and both workers ran trials"
    assert head_id not in nodes
    assert {r.metrics["node_id"] for r in outcome.results} == set(worker_ids)


def test_a_request_no_node_can_hold_fails_before_any_trial(cluster, tmp_path: Path) -> None:
    # Each worker has one slot: a trial asking for two could never be placed.
    data = {**SPEC, "sweep": {**SPEC["sweep"], "resources_per_trial": {"cpu": 1, "r2sweep_slot": 2}}}
    with pytest.raises(ClusterError, match=r"sweep\.resources_per_trial.*r2sweep_slot: 2.*largest of this cluster's 3 node"):
        run_experiment(load_sweep_spec(data), storage=tmp_path / "results")
    assert not (tmp_path / "results").exists()

    gpu = {**SPEC, "sweep": {**SPEC["sweep"], "resources_per_trial": {"cpu": 1, "gpu": 0.5}}}
    with pytest.raises(ClusterError, match=r"gpu: 0\.5.*GPU: 0"):
        run_experiment(load_sweep_spec(gpu), storage=tmp_path / "results")


def test_a_data_root_missing_on_the_workers_fails_before_any_trial(cluster, tmp_path: Path) -> None:
    data = {**SPEC, "data": {"name": "cifar10", "root": str(tmp_path / "nowhere")}}
    with pytest.raises(ClusterError, match=r"data\.root=.*nowhere.*missing on 2 of 2"):
        run_experiment(load_sweep_spec(data), storage=tmp_path / "results")
    assert not (tmp_path / "results").exists()


# The user's own module, written where only this driver's temporary folder has it: the
# workers import it only if the sweep's runtime environment ships it (py_modules).
OWN = {**SPEC, "name": "own-on-cluster",
       "data": {"factory": f"{MODULE}:load", "samples": 200},
       "train": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
       "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
       "sweep": {**SPEC["sweep"], "num_samples": 2}}


def _own_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **sweep) -> tuple[dict, Path]:
    folder = tmp_path / "driver_only"
    module = write_user_module(folder)
    monkeypatch.syspath_prepend(str(folder))  # the driver imports it; Ray gives workers only cwd and the script's folder
    records = tmp_path / "imported_from"
    spec = {**OWN, "model": {"factory": f"{MODULE}:build", "channels": 8, "record_to": str(records)},
            "sweep": {**OWN["sweep"], **sweep}}
    return spec, module


def test_a_user_module_the_workers_do_not_have_is_refused_before_any_trial(cluster, tmp_path: Path, monkeypatch) -> None:
    spec, module = _own_spec(tmp_path, monkeypatch)
    # The fixture's Ray was started without a runtime environment: the module cannot reach the workers.
    try:
        with pytest.raises(ConfigError, match=r"model\.factory='user_net:build' .*on node \w+ it fails .*No module named "
                                              r"'user_net'.*py_modules: \[.*user_net\.py\]"):
            run_experiment(load_sweep_spec(spec), storage=tmp_path / "results")
    finally:
        sys.modules.pop(MODULE, None)
    assert not (tmp_path / "imported_from").exists()  # no trial ran (and run_experiment builds no model itself)


def test_a_user_module_reaches_both_workers_through_the_runtime_env(cluster, tmp_path: Path, monkeypatch) -> None:
    _, worker_ids, _ = cluster
    spec, module = _own_spec(tmp_path, monkeypatch)
    spec["sweep"]["runtime_env"] = {"py_modules": [str(module)]}
    ray.shutdown()
    try:
        result = r2sweep.run_sweep(spec, tracking_uri=new_mlflow_store(tmp_path / "mlflow.db"), storage=tmp_path / "results",
                                   address=cluster[0].address, progress=False, register=False)
    finally:
        sys.modules.pop(MODULE, None)
    assert (result.trials["outcome"] == "finished").sum() == 2
    tracker = Tracker(result.tracking_uri)
    runs = tracker.client.search_runs([result.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")
    assert {r.data.tags[TAG_NODE_ID] for r in runs} == set(worker_ids)
    imported = {p.read_text() for p in (tmp_path / "imported_from").iterdir()}
    # The driver's check imported it from its folder; every trial process got Ray's uploaded copy.
    assert str(module) in imported and len(imported) == 2
    (shipped,) = imported - {str(module)}
    assert "runtime_resources" in shipped and not shipped.startswith(str(tmp_path))

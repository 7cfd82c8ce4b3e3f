"""A sweep whose storage is an S3 bucket (moto's S3 server on the loopback, issue 42).

Everything a cluster keeps on object storage goes there: Tune's state (``--storage
s3://...``), the pre-training cache (``<storage>/pretrain_cache`` by default) and the
artifacts of the team's MLflow server (``--artifacts-destination s3://...``). The driver is
killed mid-sweep and resumed; a trial on one node of a ``cluster_utils`` cluster takes the
pre-training another node's trial stored. Credentials come from the environment and are
found in nothing r2sweep writes. (The cache's own S3 behaviour: tests/test_pretrain_cache_s3.py.)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import ray
import yaml
from conftest import kill_group_when, new_mlflow_store, serve_mlflow, serve_moto
from mlflow import MlflowClient

import r2sweep
from r2sweep.tracking.store import TAG_ROLE, TAG_TRIAL_ID

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.server]

BUCKET = "r2sweep-store"
EPOCHS = 3
SPEC = {
    "name": "on-s3",
    "data": {"name": "synthetic", "num_samples": 256},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": EPOCHS, "batch_size": 32},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    # Two pre-trainings (lr), each wanted by two trials (the granularity is downstream only).
    "search": {"train.lr": {"choice": [0.02, 0.05]}, "downstream.0.granularity": {"choice": ["channel", "tensor"]}},
    "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 1, "scheduler": "none", "sampler": "random",
              "start_points": [{"train.lr": 0.02, "downstream.0.granularity": "channel"},
                               {"train.lr": 0.05, "downstream.0.granularity": "channel"}]},
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with serve_moto(tmp_path_factory.mktemp("moto"), BUCKET) as client:
        yield client


@pytest.fixture
def secret(s3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret key no word of any file could match by chance (moto accepts any)."""
    value = secrets.token_hex(16)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
    return value


def _objects(s3, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    return out


def _trial_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return [] if experiment is None else client.search_runs([experiment.experiment_id],
                                                             filter_string=f"tags.`{TAG_ROLE}` = 'trial'")


def test_a_sweep_on_s3_keeps_its_state_cache_and_artifacts_there_and_survives_a_driver_kill(
        s3, secret: str, tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPEC))
    server_root = tmp_path / "server"
    server_root.mkdir()
    with serve_mlflow(server_root, new_mlflow_store(server_root / "db.sqlite"), artifacts=f"s3://{BUCKET}/mlflow") as url:
        client = MlflowClient(url)
        command = [str(Path(sys.executable).with_name("r2sweep")), "sweep", "space.yaml", "--no-register",
                   "--storage", f"s3://{BUCKET}/sweeps", "--tracking-uri", url]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

        def start(*extra: str) -> subprocess.Popen:
            return subprocess.Popen([*command, *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)

        finished = lambda: sum(r.info.status == "FINISHED" for r in _trial_runs(client, "on-s3"))  # noqa: E731
        kill_group_when(start(), lambda: finished() >= 1)
        resumed = start("--resume")
        output = resumed.communicate(timeout=600)[0]
        assert resumed.returncode == 0, output[-3000:]

        trials = _trial_runs(client, "on-s3")
        assert len(trials) == 4 and len({r.data.tags[TAG_TRIAL_ID] for r in trials}) == 4
        for run in trials:
            assert run.info.status == "FINISHED"
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
            assert steps == list(range(EPOCHS)), "every epoch exactly once, across the kill"
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        # Tune's state, the cache and the server's artifacts are objects in the bucket.
        stored = _objects(s3, "")
        assert any(k.startswith("sweeps/on-s3/") and "experiment_state" in k for k in stored), sorted(stored)[:20]
        manifests = [k for k in stored if k.startswith("sweeps/pretrain_cache/entries/") and k.endswith("manifest.json")]
        assert len(manifests) == 2  # two pre-trainings, whatever the kill interrupted
        tags = sorted(r.data.tags["r2sweep.pretrain_cache"] for r in trials)
        assert tags.count("hit") >= 1 and set(tags) <= {"hit", "stored", "off"}
        assert sum(k.startswith("mlflow/") and k.endswith("trial_config.yaml") for k in stored) == 4
        # The credentials are in nothing r2sweep wrote: objects, MLflow's params, tags and artifacts.
        assert not [k for k, data in stored.items() if secret.encode() in data]
        for run in [*trials, *client.search_runs([client.get_experiment_by_name("on-s3").experiment_id],
                                                 filter_string=f"tags.`{TAG_ROLE}` = 'sweep'")]:
            assert secret not in repr(run.data.params) + repr(run.data.tags)
        assert secret not in output


def test_a_trial_on_another_node_takes_the_pre_training_from_s3(s3, secret: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)  # a URI storage keeps the journal and best.yaml in the working folder

    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # trials run on the two nodes only
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        spec = {**SPEC, "name": "two-nodes", "search": {"downstream.0.granularity": {"choice": ["channel", "tensor"]}},
                "sweep": {**SPEC["sweep"], "num_samples": 2, "start_points": [], "resources_per_trial": {"cpu": 1}}}
        uri = new_mlflow_store(tmp_path / "mlflow.db")
        r2sweep.run_sweep(spec, tracking_uri=uri, storage=f"s3://{BUCKET}/cluster", address=cluster.address,
                          progress=False, register=False)
        trials = _trial_runs(mlflow.tracking.MlflowClient(uri), "two-nodes")
        by_cache = {r.data.tags["r2sweep.pretrain_cache"]: r for r in trials}
        assert sorted(by_cache) == ["hit", "stored"]  # both trials at once, one pre-training
        assert by_cache["hit"].data.tags["r2sweep.node_id"] != by_cache["stored"].data.tags["r2sweep.node_id"]
        assert by_cache["hit"].data.metrics["ptq_rtn_w4a8/top1"] >= 0
        assert any(k.startswith("cluster/pretrain_cache/entries/") for k in _objects(s3, "cluster/"))
    finally:
        ray.shutdown()
        cluster.shutdown()

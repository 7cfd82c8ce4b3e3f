"""The tracking server goes away for a minute mid-sweep: nothing is lost, nothing doubled.

A real ``mlflow server`` (SQLite backend) is stopped once the sweep's first
trial run exists and started again 60 seconds later on the same port and store.
Meanwhile the trials keep running and the driver keeps every tracking operation
in its on-disk journal; afterwards each trial's per-epoch metrics are in MLflow
exactly once per epoch, in order, with the final metrics, and no run is RUNNING.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import _free_port, serve_mlflow
from mlflow import MlflowClient

from r2sweep.tracking.store import TAG_ROLE

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.server]

OUTAGE_S = 60
EPOCHS = 12
SPEC = {
    "name": "outage",
    "data": {"name": "synthetic", "num_samples": 256},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": EPOCHS, "batch_size": 32},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "scheduler": "none"},
}


def _trial_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("outage")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")


def test_a_60_second_outage_loses_and_doubles_nothing(tmp_path: Path) -> None:
    server_root = tmp_path / "server"
    server_root.mkdir()
    backend = f"sqlite:///{server_root / 'db.sqlite'}"
    port = _free_port()
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPEC))
    # Each MLflow request gives up after a few seconds, so the journal's own
    # retry loop (not MLflow's minutes of backoff) carries the sweep through.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    command = [str(Path(sys.executable).with_name("r2sweep")), "sweep", "space.yaml",
               "--tracking-uri", f"http://127.0.0.1:{port}"]

    with serve_mlflow(server_root, backend, port=port) as url:
        sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(url)
        deadline = time.monotonic() + 180
        while not _trial_runs(client):
            assert sweep.poll() is None, sweep.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no trial run appeared"
            time.sleep(0.5)
    # The server is down now, with the sweep's first trials just started.
    time.sleep(OUTAGE_S)
    assert sweep.poll() is None or sweep.returncode == 0

    with serve_mlflow(server_root, backend, port=port) as url:
        stdout, stderr = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, stderr[-3000:]
        assert "tracking paused" in stderr and "tracking resumed" in stderr  # the outage really hit it
        client = MlflowClient(url)
        runs = _trial_runs(client)
        assert len(runs) == SPEC["sweep"]["num_samples"]
        for run in runs:
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "val/top1")
            assert sorted(m.step for m in history) == list(range(EPOCHS)), "every epoch exactly once"
            assert "ptq_rtn_w4a8/top1" in run.data.metrics and "fp/top1" in run.data.metrics
            assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"trial_config.yaml", "weights.png"}
        (parent,) = client.search_runs([runs[0].info.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'sweep'")
        assert parent.info.status == "FINISHED"
    assert "best:" in stdout

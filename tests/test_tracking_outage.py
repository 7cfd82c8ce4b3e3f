"""The tracking server goes away for the rest of the sweep: nothing is lost, nothing doubled.

A real ``mlflow server`` (SQLite backend) is stopped once the sweep's first
trial run exists, and started again on the same port and store only once the
driver has recorded the sweep's end in its journal (and at least
``MIN_OUTAGE_S`` later): every later operation of the sweep (the first trials'
remaining epochs, the other trials' runs, every epoch, final metric, artifact and
end) happens while MLflow is away, and the driver, done training, must wait for
it. Afterwards each trial's per-epoch metrics are in MLflow exactly once per
epoch, in order, with the final metrics, and no run is RUNNING.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import _free_port, new_mlflow_store, serve_mlflow
from mlflow import MlflowClient

from r2sweep.tracking.store import TAG_ROLE

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.server]

# The outage lasts until the sweep has nothing left but to wait for MLflow, and
# never less than this: several times what one MLflow request takes to give up
# here (1 retry, 5 s timeout, below), and several of the journal's 5 s retry rounds.
MIN_OUTAGE_S = 20
END_DEADLINE_S = 300
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


def _journal_ops(tmp_path: Path) -> list[str]:
    """The operations the driver has journalled so far (docs/cluster.md: ``<storage>/<name>/tracking/``)."""
    journal = tmp_path / "r2sweep_results" / "outage" / "tracking" / "journal.jsonl"
    if not journal.exists():
        return []
    ops = []
    for line in journal.read_text().splitlines():
        try:
            ops.append(json.loads(line)["op"])
        except json.JSONDecodeError:  # the line being written right now
            break
    return ops


def test_an_outage_over_the_rest_of_the_sweep_loses_and_doubles_nothing(tmp_path: Path) -> None:
    server_root = tmp_path / "server"
    server_root.mkdir()
    backend = new_mlflow_store(server_root / "db.sqlite")
    port = _free_port()
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPEC))
    # Each MLflow request gives up after a few seconds, so the journal's own
    # retry loop (not MLflow's minutes of backoff) carries the sweep through.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    # (--no-register: the champion's export is tested elsewhere and costs this test ~20 s)
    command = [str(Path(sys.executable).with_name("r2sweep")), "sweep", "space.yaml", "--no-register",
               "--tracking-uri", f"http://127.0.0.1:{port}"]

    # Its output to files, not pipes: nobody reads a pipe during the outage, and a full
    # one would stall the driver.
    out_path, err_path = tmp_path / "sweep.out", tmp_path / "sweep.err"

    def stderr_tail() -> str:
        return err_path.read_text(errors="replace")[-3000:]

    with serve_mlflow(server_root, backend, port=port) as url, open(out_path, "w") as out, open(err_path, "w") as err:
        sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err, text=True)
        client = MlflowClient(url)
        deadline = time.monotonic() + 180
        while not _trial_runs(client):
            assert sweep.poll() is None, stderr_tail()
            assert time.monotonic() < deadline, "no trial run appeared"
            time.sleep(0.5)
    # The server is down now, with the sweep's first trials just started. It stays down
    # until the driver has journalled the end of the sweep: all training, every trial's
    # start, epochs, final metrics, artifacts and end happen during the outage.
    down = time.monotonic()
    deadline = down + END_DEADLINE_S
    while "end_sweep" not in _journal_ops(tmp_path) or time.monotonic() - down < MIN_OUTAGE_S:
        assert sweep.poll() is None, f"the sweep ended while MLflow was down: {stderr_tail()}"
        assert time.monotonic() < deadline, f"the sweep did not finish training during the outage: {_journal_ops(tmp_path)}"
        time.sleep(0.5)
    ops = _journal_ops(tmp_path)
    assert ops.count("end_trial") == SPEC["sweep"]["num_samples"] and ops.count("trial") >= SPEC["sweep"]["num_samples"]
    # Done training, the driver waits for MLflow instead of ending without it.
    time.sleep(1)
    assert sweep.poll() is None, stderr_tail()

    with serve_mlflow(server_root, backend, port=port) as url:
        sweep.wait(timeout=600)
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
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

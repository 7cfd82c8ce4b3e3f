"""The sweep's driver killed with SIGKILL, several times at different moments, then resumed.

Each round starts ``r2sweep sweep`` (``--resume`` after the first) in its own
process group and kills the whole group (driver and the Ray it started) once a
given number of trials have finished: before any, after one, after three. The
last ``--resume`` runs to the end. What must hold: exactly ``num_samples``
trials, each with exactly one MLflow run holding every epoch once, none left
RUNNING, and the Optuna study continued rather than restarted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from r2sweep.tracking import TAG_ROLE, TAG_TRIAL_ID

pytestmark = pytest.mark.slow

EPOCHS = 8
SAMPLES = 6
SPEC = {
    "name": "killed",
    "data": {"name": "synthetic", "num_samples": 256},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": EPOCHS, "batch_size": 32},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "search": {"r2.kind": {"choice": ["none", "linf"]},
               "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": "linf"}},
               "train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": SAMPLES, "max_concurrent": 2, "seed": 0, "scheduler": "none", "sampler": "tpe"},
}


def _start(work: Path, resume: bool) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("r2sweep")), "sweep", "space.yaml", *(["--resume"] if resume else [])]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finished_in_mlflow(client: MlflowClient) -> int:
    experiment = client.get_experiment_by_name("killed")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")
    return sum(1 for r in runs if r.info.status == "FINISHED")


def _kill_after(process: subprocess.Popen, client: MlflowClient, finished: int, started_marker: Path) -> None:
    """SIGKILL the process group once ``finished`` trials are FINISHED in MLflow (and trials run)."""
    deadline = time.monotonic() + 300
    while not (started_marker.exists() and _finished_in_mlflow(client) >= finished):
        assert process.poll() is None, f"the sweep ended before the kill: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_driver_killed_three_times_then_resumed_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPEC))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tmp_path / "r2sweep_results" / "killed"
    journal = experiment / "tracking" / "journal.jsonl"  # exists once the first trial started

    for round_, finished in enumerate((0, 1, 3)):
        _kill_after(_start(tmp_path, resume=round_ > 0), client, finished, journal)
    final = _start(tmp_path, resume=True)
    output = final.communicate(timeout=600)[0]
    assert final.returncode == 0, output[-3000:]

    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    trials = [r for r in runs if r.data.tags[TAG_ROLE] == "trial"]
    assert len(trials) == SAMPLES, "exactly num_samples trials"
    assert len({r.data.tags[TAG_TRIAL_ID] for r in trials}) == SAMPLES, "one run per trial"
    assert all(r.info.status != "RUNNING" for r in runs)
    assert [r.info.status for r in runs if r.data.tags[TAG_ROLE] == "sweep"] == ["FINISHED"]
    for run in trials:
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
        assert steps == list(range(EPOCHS)), f"trial {run.data.tags[TAG_TRIAL_ID]}: every epoch exactly once"
        assert "ptq_rtn_w4a8/top1" in run.data.metrics
        # Exactly its sampled parameters: strength only where the kind needs it.
        assert ("r2.strength" in run.data.params) == (run.data.params["r2.kind"] == "linf")

    # The Optuna study went on instead of starting over: as many completed
    # trials as the sweep ran, no more.
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(experiment))
    complete = [t for t in searcher._ot_study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == SAMPLES
    assert "best:" in output
    # The progress line counts the trials earlier drivers finished too (Tune
    # hands a resumed sweep its callbacks as pickled at the start).
    last = [line for line in output.splitlines() if "; trials: " in line][-1]
    best = max(r.data.metrics["ptq_rtn_w4a8/top1"] for r in trials)
    assert f"trials: {SAMPLES} finished, 0 stopped, 0 failed, 0 running of {SAMPLES}" in last, last
    assert last.endswith(f"= {best:.2f}"), last


def test_files_a_kill_tore_are_repaired_before_tune_reads_them(tmp_path: Path) -> None:
    import json
    import pickle

    from r2sweep.sweep.tuner import _repair_experiment

    (tmp_path / "tuner.pkl").write_bytes(b"")  # truncated by an in-place rewrite
    (tmp_path / "r2sweep_tuner.pkl").write_bytes(pickle.dumps({"state": 1}))
    for stamp, text in (("2026-01-01_00-00-01", json.dumps({"ok": 1})), ("2026-01-01_00-00-02", '{"torn": ')):
        (tmp_path / f"experiment_state-{stamp}.json").write_text(text)
        (tmp_path / f"searcher-state-{stamp}.pkl").write_bytes(b"x")
    _repair_experiment(str(tmp_path))
    assert pickle.loads((tmp_path / "tuner.pkl").read_bytes()) == {"state": 1}
    assert sorted(p.name for p in tmp_path.glob("*state-*")) == [
        "experiment_state-2026-01-01_00-00-01.json", "searcher-state-2026-01-01_00-00-01.pkl"]
    assert sorted(p.name for p in (tmp_path / "torn_snapshots").iterdir()) == [
        "experiment_state-2026-01-01_00-00-02.json", "searcher-state-2026-01-01_00-00-02.pkl"]


def test_a_snapshot_naming_deleted_checkpoints_gets_the_newest_one_under_those_names(tmp_path: Path) -> None:
    import json
    import pickle

    from r2sweep.sweep.tuner import _repair_experiment

    trial = tmp_path / "trainable_ab12cd34_3_lr=0.1"
    for name, epoch in (("checkpoint_000004", 4), ("checkpoint_000005", 5)):
        (trial / name).mkdir(parents=True)
        (trial / name / "pretrain_state.pt").write_text(str(epoch))
    blob = pickle.dumps({"latest": str(trial / "checkpoint_000001"), "older": "checkpoint_000000"}).hex()
    snapshot = {"trial_data": [[json.dumps({"trial_id": "ab12cd34"}),
                                json.dumps({"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob}})]]}
    (tmp_path / "experiment_state-2026-01-01_00-00-01.json").write_text(json.dumps(snapshot))
    _repair_experiment(str(tmp_path))
    for name in ("checkpoint_000000", "checkpoint_000001"):
        assert (trial / name / "pretrain_state.pt").read_text() == "5"  # the newest state, under the old name

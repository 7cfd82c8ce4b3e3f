"""The sweep's driver killed with SIGKILL, several times at different moments, then resumed.

Each round starts ``r2sweep sweep`` (``--resume`` after the first) in its own
process group and kills the whole group (driver and the Ray it started) once a
given number of trials have finished: before any, then after two. The last
``--resume`` runs to the end. What must hold: exactly ``num_samples``
trials, each with exactly one MLflow run holding every epoch once, none left
RUNNING, and the Optuna study continued rather than restarted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import kill_group_when, new_mlflow_store
from mlflow import MlflowClient

from r2sweep.tracking.store import TAG_ROLE, TAG_TRIAL_ID

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EPOCHS = 5  # enough epochs for a kill to land mid-trial; tests/test_object_storage.py kills a sweep on S3 too
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
    # --no-register: the champion's export is tested elsewhere; here it would only cost time.
    command = [str(Path(sys.executable).with_name("r2sweep")), "sweep", "space.yaml", "--no-register",
               *(["--resume"] if resume else [])]
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
    kill_group_when(process, lambda: started_marker.exists() and _finished_in_mlflow(client) >= finished)


def test_driver_killed_twice_then_resumed_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPEC))
    client = MlflowClient(new_mlflow_store(tmp_path / "mlflow.db"))
    experiment = tmp_path / "r2sweep_results" / "killed"
    journal = experiment / "tracking" / "journal.jsonl"  # exists once the first trial started

    for round_, finished in enumerate((0, 2)):
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
    # The lasting Optuna study (optuna-dashboard's) holds Tune's trials exactly: one
    # each, all complete, with MLflow's values and run ids, whatever the kills left.
    import optuna

    lasting = optuna.load_study(study_name="killed", storage=f"sqlite:///{experiment}/optuna.db").trials
    by_run = {r.info.run_id: r for r in trials}
    assert len(lasting) == SAMPLES and {t.user_attrs["mlflow_run_id"] for t in lasting} == set(by_run)
    for trial in lasting:
        run = by_run[trial.user_attrs["mlflow_run_id"]]
        assert trial.state.name == "COMPLETE" and trial.value == run.data.metrics["ptq_rtn_w4a8/top1"]
        assert trial.user_attrs["tune_trial_id"] == run.data.tags[TAG_TRIAL_ID]
        assert trial.params["train.lr"] == float(run.data.params["train.lr"])
    assert "best:" in output and "not registered (--no-register)" in output
    assert client.search_registered_models() == []
    # The progress line counts the trials earlier drivers finished too (Tune
    # hands a resumed sweep its callbacks as pickled at the start).
    last = [line for line in output.splitlines() if "; trials: " in line][-1]
    best = max(r.data.metrics["ptq_rtn_w4a8/top1"] for r in trials)
    assert f"trials: {SAMPLES} finished, 0 stopped, 0 diverged, 0 failed, 0 running of {SAMPLES}" in last, last
    assert last.endswith(f"= {best:.2f}"), last

"""``select_best`` registers the champion only when it changed: asking twice adds no model version.

A real tracked sweep without Ray: the parent run and trial runs written through
Tracker/SweepRun as the sweep's callback writes them, each trial with a real
``pretrained.pt`` and ``pretrained.pt2`` (from a one-epoch trial), in a SQLite store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import new_mlflow_store
from mlflow import MlflowClient

from r2sweep.analysis.select import select_best
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.trial import MODEL_ARCHIVE, PRETRAINED, run_trial
from r2sweep.tracking.store import TAG_OUTCOME, SweepRun, Tracker

NAME = "champion-once"
MODEL = f"r2sweep-{NAME}"
OBJECTIVE = "ptq_rtn_w4a8/top1"
TRIAL = {
    "data": {"name": "synthetic", "num_samples": 64},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 1},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
}
SPEC = {
    "name": NAME,
    **TRIAL,
    "objective": {"metric": OBJECTIVE, "mode": "max"},
    "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": 2},
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trial")
    run_trial(load_trial_config(TRIAL), out_dir=out)
    return out / PRETRAINED


def _finished_trial(sweep: SweepRun, trial_id: str, objective: float, pretrained: Path) -> str:
    run_id = sweep.trial_run(trial_id, {"train.lr": 0.05})
    sweep.log_metrics(run_id, {OBJECTIVE: objective, "fp/top1": 90.0})
    sweep.log_artifact(run_id, pretrained)
    sweep.log_artifact(run_id, pretrained.with_name(MODEL_ARCHIVE))  # the exported model the trial wrote
    sweep.set_tags(run_id, {TAG_OUTCOME: "finished"})
    sweep.end_trial(run_id, "FINISHED")
    return run_id


def test_the_champion_is_registered_again_only_when_a_better_trial_appears(tmp_path: Path, pretrained: Path) -> None:
    tracker = Tracker(new_mlflow_store(tmp_path / "mlflow.db"), artifact_location=str(tmp_path / "artifacts"))
    sweep = tracker.start_sweep(NAME, yaml.safe_dump(SPEC))
    first = _finished_trial(sweep, "t0", 50.0, pretrained)
    client = MlflowClient(tracker.tracking_uri)

    assert select_best(tracker, NAME).model_version == "1"
    again = select_best(tracker, NAME)  # `r2sweep best` run twice, nothing changed
    assert again.model_version == "1" and again.run_id == first
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert len(client.search_logged_models([sweep.experiment_id])) == 1  # no second copy of the weights

    better = _finished_trial(sweep, "t1", 70.0, pretrained)
    assert select_best(tracker, NAME).model_version == "2"
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "2" and champion.run_id == better
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == ["1", "2"]


def test_the_champion_takes_any_batch_size(tmp_path: Path, pretrained: Path, monkeypatch, caplog) -> None:
    import mlflow
    import torch

    tracker = Tracker(new_mlflow_store(tmp_path / "mlflow.db"), artifact_location=str(tmp_path / "artifacts"))
    sweep = tracker.start_sweep(NAME, yaml.safe_dump(SPEC))
    _finished_trial(sweep, "t0", 50.0, pretrained)
    with caplog.at_level("WARNING"):
        select_best(tracker, NAME)
    # torch.export kept the batch dimension dynamic: nothing was specialized to the example's size.
    assert not [r.getMessage() for r in caplog.records if "specialized" in r.getMessage()]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    champion = mlflow.pytorch.load_model(f"models:/{MODEL}@champion")
    for batch in (1, 3):
        assert tuple(champion(torch.zeros(batch, 1, 8, 8)).shape) == (batch, 10)

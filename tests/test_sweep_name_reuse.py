"""A sweep name MLflow already holds is never reused for a second sweep.

Run a sweep, delete its results folder (Tune's state), run the same name again
without --resume: the new trials used to become children of the old parent run,
judged by the old spec (reproduced: 4 trial runs under a sweep of 2). Now the
second run is refused before anything starts, and the store keeps one sweep.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray
import yaml
from conftest import tiny_sweep

from r2sweep.cli import main
from r2sweep.tracking import TAG_ROLE, Tracker

SPEC = tiny_sweep("reused")


def _runs(tracker: Tracker) -> tuple[list, list]:
    experiment = tracker.client.get_experiment_by_name("reused").experiment_id
    runs = tracker.client.search_runs([experiment])
    return ([r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"],
            [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"])


@pytest.mark.ray
def test_a_name_whose_tune_state_is_gone_is_refused_not_merged(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPEC))
    try:
        assert main(["sweep", "space.yaml", "--tracking-uri", "sqlite:///mlflow.db"]) == 0
    finally:
        ray.shutdown()
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, trials = _runs(tracker)
    assert len(parents) == 1 and len(trials) == 2
    capsys.readouterr()

    shutil.rmtree(tmp_path / "r2sweep_results")
    assert main(["sweep", "space.yaml", "--tracking-uri", "sqlite:///mlflow.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("r2sweep: error: --name='reused' is not valid: a new sweep name: ")
    assert "already holds sweep 'reused' (2 trials" in err[0] and "pass --name for a new sweep" in err[0]
    assert not ray.is_initialized() and not (tmp_path / "r2sweep_results").exists()
    parents_after, trials_after = _runs(tracker)
    assert [r.info.run_id for r in parents_after] == [r.info.run_id for r in parents]
    assert sorted(r.info.run_id for r in trials_after) == sorted(r.info.run_id for r in trials)

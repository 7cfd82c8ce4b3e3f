"""The sweep on a real local Ray: Optuna proposes, ASHA stops, only final objectives reach Optuna."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest

from r2sweep.sweep.spec import load_sweep_spec

ray = pytest.importorskip("ray")

TINY = {
    "name": "tiny",
    "data": {"name": "synthetic", "num_samples": 256},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 3, "batch_size": 32},
    "r2": {"kind": "none"},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2]}],
    "objective": {"metric": "ptq_rtn_w2a8/top1", "mode": "max"},
    "search": {
        "r2.kind": {"choice": ["none", "linf"]},
        "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": "linf"}},
        "train.lr": {"loguniform": [0.01, 0.2]},
    },
    "sweep": {"num_samples": 6, "max_concurrent": 2, "seed": 0, "scheduler": "asha"},
}


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_sweep(local_ray, tmp_path_factory: pytest.TempPathFactory):
    from r2sweep.sweep.tuner import run_sweep

    storage = tmp_path_factory.mktemp("sweeps")
    return run_sweep(load_sweep_spec(TINY), storage=storage)


def _study(path: str) -> optuna.Study:
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(path)
    return searcher._ot_study


def test_every_sample_runs_with_its_conditional_parameters(tiny_sweep) -> None:
    results = list(tiny_sweep.results)
    assert len(results) == TINY["sweep"]["num_samples"]
    for result in results:
        assert result.error is None
        config = result.config
        assert ("r2.strength" in config) == (config["r2.kind"] == "linf")
        assert 0.01 <= config["train.lr"] <= 0.2


def test_asha_stops_some_trials_and_optuna_sees_only_final_objectives(tiny_sweep) -> None:
    results = list(tiny_sweep.results)
    finished = tiny_sweep.finished()
    stopped = [r for r in results if r not in finished]
    assert finished, "at least one trial runs to the end"
    for result in finished:
        assert result.metrics["final"] == 1 and 0 <= result.metrics["ptq_rtn_w2a8/top1"] <= 100
        assert result.metrics["training_iteration"] == TINY["train"]["epochs"] + 1
    for result in stopped:
        assert result.metrics["training_iteration"] <= TINY["train"]["epochs"]
        assert "ptq_rtn_w2a8/top1" not in result.metrics
    study = _study(tiny_sweep.path)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(finished)
    assert states.count(optuna.trial.TrialState.PRUNED) == len(stopped)
    values = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert values == sorted(r.metrics["ptq_rtn_w2a8/top1"] for r in finished)


def test_best_is_the_highest_finished_objective(tiny_sweep) -> None:
    best = tiny_sweep.best()
    assert best.metrics["ptq_rtn_w2a8/top1"] == max(r.metrics["ptq_rtn_w2a8/top1"] for r in tiny_sweep.finished())


def test_checkpoints_hold_the_pretraining_state_then_the_trial_artifacts(tiny_sweep) -> None:
    finished = tiny_sweep.finished()
    for result in tiny_sweep.results:
        assert result.checkpoint is not None
        with result.checkpoint.as_directory() as directory:
            names = {p.name for p in Path(directory).iterdir()}
        if result in finished:  # the final report's checkpoint: what tracking logs
            assert {"pretrained.pt", "weights.png", "trial_config.yaml"} <= names
        else:  # stopped after an epoch: the state a restart resumes from
            assert names == {"pretrain_state.pt"}

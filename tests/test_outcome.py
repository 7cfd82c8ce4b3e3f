"""How a trial ended is decided once (r2sweep.outcome) and every reader agrees.

The real case that used to disagree: a trial whose pre-training is fine but whose
*objective's* downstream result diverged (``<result>/diverged``). The tracking
callback only looked at a top-level ``diverged`` and logged it as stopped (MLflow
KILLED, "stopped early" on the console). And with several objectives the console
and MLflow looked at the first one only, while ``best`` asked for all of them.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import ray
from conftest import new_mlflow_store

import r2sweep
from r2sweep.analysis.compare import compare_sweeps
from r2sweep.analysis.select import select_best
from r2sweep.core.errors import R2SweepError
from r2sweep.core.outcome import (
    DIVERGED,
    FAILED,
    FINISHED,
    RUN_STATUS,
    RUNNING,
    STOPPED,
    TAG_OUTCOME,
    decide_outcome,
    finished_runs,
    run_outcome,
)
from r2sweep.tracking.store import TAG_ROLE, Tracker

OBJECTIVE = ["qat_lsq_w4a8/top1"]


@pytest.mark.parametrize(("metrics", "objectives", "errored", "expected"), [
    ({"qat_lsq_w4a8/top1": 51.0, "final": 1}, OBJECTIVE, False, FINISHED),
    ({"qat_lsq_w4a8/diverged": 1, "fp/top1": 80.0, "final": 1}, OBJECTIVE, False, DIVERGED),
    ({"diverged": 1.0, "final": 1}, OBJECTIVE, False, DIVERGED),
    ({"val/top1": 40.0, "proxy/top1": 30.0}, OBJECTIVE, False, STOPPED),  # no final report
    ({"fp/top1": 80.0, "final": 1}, OBJECTIVE, False, FAILED),  # final, objective missing, no reason
    ({"qat_lsq_w4a8/top1": 51.0, "final": 1}, OBJECTIVE, True, FAILED),
    ({"qat_lsq_w4a8/top1": float("nan"), "final": 1}, OBJECTIVE, False, FAILED),
    # Several objectives: finished only with all of them.
    ({"ptq_rtn_w4a8/top1": 70.0, "qat_lsq_w4a8/diverged": 1, "final": 1}, ["ptq_rtn_w4a8/top1", *OBJECTIVE], False, DIVERGED),
    ({"ptq_rtn_w4a8/top1": 70.0, "qat_lsq_w4a8/top1": 50.0}, ["ptq_rtn_w4a8/top1", *OBJECTIVE], False, FINISHED),
    # A diverged result that is not an objective does not make the trial diverged.
    ({"ptq_rtn_w4a8/top1": 70.0, "qat_lsq_w4a8/diverged": 1, "final": 1}, ["ptq_rtn_w4a8/top1"], False, FINISHED),
    (None, OBJECTIVE, False, STOPPED),
])
def test_the_decision(metrics, objectives, errored, expected) -> None:
    assert decide_outcome(metrics, objectives, errored=errored) == expected


def _run(tags: dict, status: str, metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(tags=tags, metrics=metrics), info=SimpleNamespace(status=status))


def test_a_run_read_back_keeps_the_recorded_decision_and_decides_untagged_ones_the_same_way() -> None:
    assert run_outcome(_run({TAG_OUTCOME: STOPPED}, "KILLED", {"qat_lsq_w4a8/top1": 1.0}), OBJECTIVE) == STOPPED
    assert run_outcome(_run({}, "RUNNING", {"val/top1": 3.0}), OBJECTIVE) == RUNNING
    # Final metrics logged, tag not yet applied: finished already.
    assert run_outcome(_run({}, "RUNNING", {"qat_lsq_w4a8/top1": 3.0}), OBJECTIVE) == FINISHED
    assert run_outcome(_run({}, "FAILED", {"diverged": 1.0}), OBJECTIVE) == DIVERGED
    assert run_outcome(_run({}, "FAILED", {}), OBJECTIVE) == FAILED
    runs = [_run({}, "FINISHED", {"qat_lsq_w4a8/top1": 3.0}), _run({TAG_OUTCOME: DIVERGED}, "FAILED", {})]
    assert finished_runs(runs, OBJECTIVE) == runs[:1]


# The QAT fine-tuning's absurd lr and weight decay blow its weights up to inf within a
# few steps (its loss turns non-finite) after a healthy pre-training: the objective's
# result diverges, the trial runs to its end. One real sweep (a few tens of seconds);
# the multi-objective rule is the same function, pinned by the table above.
SPEC = {
    "name": "qat-diverges",
    "data": {"name": "synthetic", "num_samples": 96},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 1, "batch_size": 32},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]},
                   {"method": "qat", "algorithm": "lsq", "weight_bits": [4], "epochs": 1, "lr": 1.0e30,
                    "weight_decay": 1.0, "batch_size": 16}],
    "objective": {"metric": "qat_lsq_w4a8/top1", "mode": "max"},
    "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": 2, "max_concurrent": 2, "seed": 0, "scheduler": "none"},
}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("outcome")
    tracker = Tracker(new_mlflow_store(root / "mlflow.db"))
    lines: list[str] = []
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r2sweep.run_sweep(SPEC, tracking_uri=tracker.tracking_uri, storage=root / "results", progress=lines.append,
                          register=False)
    finally:
        ray.shutdown()
    return tracker, lines


@pytest.mark.ray
def test_a_diverged_objective_result_is_diverged_everywhere(sweeps) -> None:
    tracker, lines = sweeps
    name = SPEC["name"]
    experiment = tracker.client.get_experiment_by_name(name).experiment_id
    runs = tracker.client.search_runs([experiment], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags[TAG_OUTCOME] == DIVERGED
        assert run.info.status == RUN_STATUS[DIVERGED] == "FAILED"
        assert run.data.metrics["qat_lsq_w4a8/diverged"] == 1.0
        assert run.data.metrics["ptq_rtn_w4a8/top1"] > 0  # the other result and the pre-training are kept
    ends = [line for line in lines if "trial " in line and ": diverged (qat_lsq_w4a8)" in line]
    assert len(ends) == 2, lines
    assert "0 finished, 0 stopped, 2 diverged, 0 failed" in lines[-1]

    with pytest.raises(R2SweepError, match="no finished trial"):
        select_best(tracker, name, register=False)
    (row,) = compare_sweeps(tracker, [name])
    assert (row.finished, row.stopped, row.failed) == (0, 0, 2)

"""``r2sweep compare`` on two real sweeps in one real MLflow store, checked against MLflow itself."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import ray  # noqa: F401 - a hard dependency: a broken install fails here, never skips
from conftest import run_tracked_sweeps

from r2sweep.analysis.compare import compare_sweeps
from r2sweep.cli.app import main
from r2sweep.tracking.store import TAG_ROLE, Tracker

pytestmark = pytest.mark.ray

BASE = {
    "data": {"name": "synthetic", "num_samples": 128},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "batch_size": 32},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2, 4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "sampler": "random", "scheduler": "none"},
}
WITH_AND_WITHOUT = {**BASE, "name": "kinds", "r2": {"kind": "none"},
                    "search": {"r2.kind": {"choice": ["none", "linf"]},
                               "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": ["linf"]}},
                               "train.lr": {"loguniform": [0.01, 0.1]}}}
LINF_ONLY = {**BASE, "name": "linf-only", "r2": {"kind": "linf", "strength": 0.01},
             "search": {"train.lr": {"loguniform": [0.01, 0.1]}}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_tracked_sweeps(tmp_path_factory.mktemp("compare"), WITH_AND_WITHOUT, LINF_ONLY)


def _trials(tracker: Tracker, name: str) -> list:
    experiment = tracker.client.get_experiment_by_name(name)
    return tracker.client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")


def test_compare_gives_each_sweep_its_best_checked_against_mlflow(store: Path) -> None:
    tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}")
    rows = compare_sweeps(tracker, ["kinds", "linf-only"], metrics=["ptq_rtn_w2a8/top1"])
    assert [r.sweep for r in rows] == ["kinds", "linf-only"]
    for row in rows:
        runs = _trials(tracker, row.sweep)
        values = [r.data.metrics["ptq_rtn_w4a8/top1"] for r in runs]
        key = max((r.data.metrics["ptq_rtn_w4a8/top1"], r.data.metrics["fp/top1"]) for r in runs)
        best = [r for r in runs if (r.data.metrics["ptq_rtn_w4a8/top1"], r.data.metrics["fp/top1"]) == key]
        assert row.finished == len(runs) == 4 and row.stopped == row.failed == 0
        assert row.best == max(values)
        assert row.fp_top1 == key[1]
        # Ties on both are possible on tiny data: the row is one of the tied trials.
        (chosen,) = [r for r in best if r.data.params == row.best_params]
        assert row.extra["ptq_rtn_w2a8/top1"] == chosen.data.metrics["ptq_rtn_w2a8/top1"]
        assert row.wall_s > 0
    kinds = _trials(tracker, "kinds")
    no_r2 = [r.data.metrics["ptq_rtn_w4a8/top1"] for r in kinds if r.data.params["r2.kind"] == "none"]
    assert no_r2, "the seeded sampler drew trials without R2"
    assert rows[0].gain_over_no_r2 == pytest.approx(rows[0].best - max(no_r2))
    assert rows[1].gain_over_no_r2 is None  # that sweep never ran without R2


def test_compare_by_r2_kind_gives_one_row_per_kind(store: Path) -> None:
    tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}")
    rows = compare_sweeps(tracker, ["kinds"], by="r2.kind")
    kinds = {r.data.params["r2.kind"] for r in _trials(tracker, "kinds")}
    assert [r.group for r in rows] == sorted(kinds)
    assert sum(r.finished for r in rows) == 4
    none_row = next(r for r in rows if r.group == "none")
    assert none_row.gain_over_no_r2 == 0


def test_cli_prints_a_table_csv_and_json(store: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(store)
    assert main(["compare", "kinds", "linf-only"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["sweep", "group", "finished"] and len(table) == 3
    assert main(["compare", "kinds", "linf-only", "--format", "csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["sweep"] for r in parsed] == ["kinds", "linf-only"]
    assert main(["compare", "kinds", "--format", "json", "--by", "r2.kind"]) == 0
    assert {r["group"] for r in json.loads(capsys.readouterr().out)} <= {"none", "linf"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "no-such-sweep"], "no sweep named 'no-such-sweep'"),
        (["compare", "kinds", "--metric", "dkm_w1/top1"], "--metric 'dkm_w1/top1': no trial of ['kinds'] has it"),
    ],
)
def test_bad_names_and_metrics_are_one_line_exit_2(store: Path, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(store)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_no_store_is_an_error_and_is_not_created(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare", "anything"]) == 2
    assert "no MLflow store at mlflow.db" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

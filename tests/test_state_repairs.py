"""The repairs of Tune's own saved state after a driver kill, and the Ray versions they run on.

Every case runs twice: on a local folder and on the same folder named by a
``file://`` URI, which goes through pyarrow's URI file system exactly as an
``s3://`` or ``gs://`` storage would.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import ray

from r2sweep.tune.experiment_files import ExperimentFolder
from r2sweep.tune.state_repairs import (
    VERIFIED_RAY,
    backup_tuner_state,
    is_verified_ray,
    repair_tune_state,
)


@pytest.fixture(params=["path", "uri"])
def named(request):
    """How the experiment folder is named: ``str(path)`` or ``file://path``."""
    return (lambda path: str(path)) if request.param == "path" else (lambda path: Path(path).as_uri())


@pytest.fixture
def verified_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repairs run whatever Ray is installed: these tests are about what they do."""
    monkeypatch.setattr(ray, "__version__", f"{VERIFIED_RAY[0]}.0")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _torn_tuner_state(root: Path) -> None:
    (root / "tuner.pkl").write_bytes(b"")  # truncated by an in-place rewrite
    (root / "r2sweep_tuner.pkl").write_bytes(pickle.dumps({"state": 1}))


def test_files_a_kill_tore_are_repaired_before_tune_reads_them(tmp_path: Path, named, verified_ray) -> None:
    _torn_tuner_state(tmp_path)
    for stamp, text in (("2026-01-01_00-00-01", json.dumps({"ok": 1})), ("2026-01-01_00-00-02", '{"torn": ')):
        (tmp_path / f"experiment_state-{stamp}.json").write_text(text)
        (tmp_path / f"searcher-state-{stamp}.pkl").write_bytes(b"x")
    done = repair_tune_state(ExperimentFolder(named(tmp_path)))
    assert pickle.loads((tmp_path / "tuner.pkl").read_bytes()) == {"state": 1}
    assert sorted(p.name for p in tmp_path.glob("*state-*")) == [
        "experiment_state-2026-01-01_00-00-01.json", "searcher-state-2026-01-01_00-00-01.pkl"]
    assert sorted(p.name for p in (tmp_path / "torn_snapshots").iterdir()) == [
        "experiment_state-2026-01-01_00-00-02.json", "searcher-state-2026-01-01_00-00-02.pkl"]
    assert done == [
        "tuner.pkl was empty or torn: put back the copy in r2sweep_tuner.pkl",
        ("experiment_state-2026-01-01_00-00-02.json was torn: moved it and the 1 file(s) saved with it to "
         "torn_snapshots/, so Tune restores experiment_state-2026-01-01_00-00-01.json"),
    ]


def test_a_snapshot_naming_deleted_checkpoints_gets_the_newest_one_under_those_names(
        tmp_path: Path, named, verified_ray) -> None:
    trial = tmp_path / "trainable_ab12cd34_3_lr=0.1"
    for name, epoch in (("checkpoint_000004", 4), ("checkpoint_000005", 5)):
        (trial / name / "sub").mkdir(parents=True)
        (trial / name / "pretrain_state.pt").write_text(str(epoch))
        (trial / name / "sub" / "extra.txt").write_text(str(epoch))
    blob = pickle.dumps({"latest": str(trial / "checkpoint_000001"), "older": "checkpoint_000000"}).hex()
    snapshot = {"trial_data": [[json.dumps({"trial_id": "ab12cd34"}),
                                json.dumps({"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob}})]]}
    (tmp_path / "experiment_state-2026-01-01_00-00-01.json").write_text(json.dumps(snapshot))
    done = repair_tune_state(ExperimentFolder(named(tmp_path)))
    for name in ("checkpoint_000000", "checkpoint_000001"):
        assert (trial / name / "pretrain_state.pt").read_text() == "5"  # the newest state, under the old name
        assert (trial / name / "sub" / "extra.txt").read_text() == "5"
    assert done == [
        ("trainable_ab12cd34_3_lr=0.1: experiment_state-2026-01-01_00-00-01.json names deleted checkpoint(s) "
         "checkpoint_000000, checkpoint_000001: copied the newest, checkpoint_000005, under those names")]
    assert repair_tune_state(ExperimentFolder(named(tmp_path))) == []  # once mended, nothing more to do


def test_a_whole_experiment_needs_no_repair(tmp_path: Path, named, verified_ray) -> None:
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"state": 2}))
    (tmp_path / "r2sweep_tuner.pkl").write_bytes(pickle.dumps({"state": 1}))
    (tmp_path / "experiment_state-2026-01-01_00-00-01.json").write_text(json.dumps({"trial_data": []}))
    before = _tree(tmp_path)
    assert repair_tune_state(ExperimentFolder(named(tmp_path))) == []
    assert _tree(tmp_path) == before


def test_the_tuner_backup_is_written_whole(tmp_path: Path, named) -> None:
    folder = ExperimentFolder(named(tmp_path / "sweep"))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "tuner.pkl").write_bytes(b"state")
    backup_tuner_state(folder)
    assert (tmp_path / "sweep" / "r2sweep_tuner.pkl").read_bytes() == b"state"
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["r2sweep_tuner.pkl", "tuner.pkl"]


@pytest.mark.parametrize(("version", "verified"), [
    ("2.60.0", True), ("2.60.3", True), ("2.60.0rc1", True), ("2.60", True),
    ("2.6.0", False), ("2.61.0", False), ("2.59.1", False), ("3.0.0.dev0", False), ("", False), ("unknown", False),
])
def test_the_repairs_run_only_on_a_verified_ray_major_minor(version: str, verified: bool) -> None:
    assert is_verified_ray(version) is verified


def test_the_installed_ray_is_one_the_repairs_were_verified_on() -> None:
    assert is_verified_ray(ray.__version__), f"Ray {ray.__version__}: check the repairs against it, then add it to VERIFIED_RAY"


@pytest.mark.parametrize("version", ["2.60.0", "2.60.7"])
def test_on_a_verified_ray_an_empty_tuner_state_is_restored(
        tmp_path: Path, named, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(ray, "__version__", version)
    _torn_tuner_state(tmp_path)
    assert repair_tune_state(ExperimentFolder(named(tmp_path))) == [
        "tuner.pkl was empty or torn: put back the copy in r2sweep_tuner.pkl"]
    assert pickle.loads((tmp_path / "tuner.pkl").read_bytes()) == {"state": 1}


def test_on_another_ray_nothing_is_touched_and_the_skip_is_said(
        tmp_path: Path, named, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    _torn_tuner_state(tmp_path)
    for stamp, text in (("2026-01-01_00-00-01", json.dumps({"ok": 1})), ("2026-01-01_00-00-02", '{"torn": ')):
        (tmp_path / f"experiment_state-{stamp}.json").write_text(text)
    before = _tree(tmp_path)
    experiment = named(tmp_path)
    done = repair_tune_state(ExperimentFolder(experiment))
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no torn_snapshots/ either
    assert len(done) == 1
    line = done[0]
    assert "verified on Ray 2.60 and are skipped on Ray 2.61" in line
    assert experiment in line
    assert "copy r2sweep_tuner.pkl over it" in line and "experiment_state-<time>.json" in line


def _snapshot(root: Path, stamp: str, trials: int, counter: int) -> None:
    """A snapshot holding ``trials`` trials, and the search-generator state of its session counting ``counter``."""
    import ray.cloudpickle as cloudpickle

    data = [[json.dumps({"trial_id": f"t{i}"}), json.dumps({})] for i in range(trials)]
    (root / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": data}))
    live = {f"t{i}" for i in range(max(0, trials - 2), counter)}  # the last two created are running
    limiter = {"max_concurrent": 2, "live_trials": live, "num_unfinished_live_trials": len(live)}
    (root / f"search_gen_state-{stamp}.json").write_bytes(cloudpickle.dumps(
        {"counter": counter, "total_samples": 6, "finished": False, "experiment": None, "name:ConcurrencyLimiter": limiter}))
    (root / f"searcher-state-{stamp}.pkl").write_bytes(b"optuna")


def _state(root: Path, stamp: str) -> dict:
    import ray.cloudpickle as cloudpickle

    return cloudpickle.loads((root / f"search_gen_state-{stamp}.json").read_bytes())


def test_a_searcher_state_ahead_of_the_snapshot_is_brought_back_to_it(tmp_path: Path, named, verified_ray) -> None:
    early, late = "2026-01-01_00-00-01", "2026-01-01_00-00-02"
    _snapshot(tmp_path, early, trials=4, counter=5)  # synced after the snapshot: one trial ahead
    # A later driver session whose searcher files were copied before its snapshot was:
    (tmp_path / f"search_gen_state-{late}.json").write_bytes(b"later")
    (tmp_path / f"searcher-state-{late}.pkl").write_bytes(b"later")
    done = repair_tune_state(ExperimentFolder(named(tmp_path)))
    state = _state(tmp_path, early)
    assert state["counter"] == 4
    # The trial only the searcher knew no longer holds a concurrency slot; the snapshot's own still do.
    assert state["name:ConcurrencyLimiter"]["live_trials"] == {"t2", "t3"}
    assert state["name:ConcurrencyLimiter"]["num_unfinished_live_trials"] == 2
    assert sorted(p.name for p in (tmp_path / "torn_snapshots").iterdir()) == [
        f"search_gen_state-{late}.json", f"searcher-state-{late}.pkl"]
    assert (tmp_path / f"searcher-state-{early}.pkl").read_bytes() == b"optuna"  # its own searcher stays
    assert len(done) == 2 and "newer than" in done[0] and "counted 5 trials" in done[1] and "holds 4" in done[1]


def test_a_searcher_in_step_with_its_snapshot_is_left_alone(tmp_path: Path, named, verified_ray) -> None:
    _snapshot(tmp_path, "2026-01-01_00-00-01", trials=3, counter=3)
    _snapshot(tmp_path, "2026-01-01_00-00-02", trials=5, counter=5)  # the newest: what Tune restores
    before = _tree(tmp_path)
    assert repair_tune_state(ExperimentFolder(named(tmp_path))) == []
    assert _tree(tmp_path) == before

"""The files r2sweep keeps in a Tune experiment folder, and their repairs: local or at a storage URI.

Every case runs twice: on a local folder and on the same folder named by a
``file://`` URI, which goes through pyarrow's URI file system exactly as an
``s3://`` or ``gs://`` storage would (the code path used to be skipped for any
``--storage`` URI: no resume check, no repairs).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import ray
import yaml
from conftest import tiny_sweep

from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.errors import ConfigError
from r2sweep.tune.experiment_files import ExperimentFolder
from r2sweep.tune.tuner import run_sweep


@pytest.fixture(params=["path", "uri"])
def named(request):
    """How the experiment folder is named: ``str(path)`` or ``file://path``."""
    return (lambda path: str(path)) if request.param == "path" else (lambda path: Path(path).as_uri())


def test_files_a_kill_tore_are_repaired_before_tune_reads_them(tmp_path: Path, named) -> None:
    (tmp_path / "tuner.pkl").write_bytes(b"")  # truncated by an in-place rewrite
    (tmp_path / "r2sweep_tuner.pkl").write_bytes(pickle.dumps({"state": 1}))
    for stamp, text in (("2026-01-01_00-00-01", json.dumps({"ok": 1})), ("2026-01-01_00-00-02", '{"torn": ')):
        (tmp_path / f"experiment_state-{stamp}.json").write_text(text)
        (tmp_path / f"searcher-state-{stamp}.pkl").write_bytes(b"x")
    ExperimentFolder(named(tmp_path)).repair()
    assert pickle.loads((tmp_path / "tuner.pkl").read_bytes()) == {"state": 1}
    assert sorted(p.name for p in tmp_path.glob("*state-*")) == [
        "experiment_state-2026-01-01_00-00-01.json", "searcher-state-2026-01-01_00-00-01.pkl"]
    assert sorted(p.name for p in (tmp_path / "torn_snapshots").iterdir()) == [
        "experiment_state-2026-01-01_00-00-02.json", "searcher-state-2026-01-01_00-00-02.pkl"]


def test_a_snapshot_naming_deleted_checkpoints_gets_the_newest_one_under_those_names(tmp_path: Path, named) -> None:
    trial = tmp_path / "trainable_ab12cd34_3_lr=0.1"
    for name, epoch in (("checkpoint_000004", 4), ("checkpoint_000005", 5)):
        (trial / name / "sub").mkdir(parents=True)
        (trial / name / "pretrain_state.pt").write_text(str(epoch))
        (trial / name / "sub" / "extra.txt").write_text(str(epoch))
    blob = pickle.dumps({"latest": str(trial / "checkpoint_000001"), "older": "checkpoint_000000"}).hex()
    snapshot = {"trial_data": [[json.dumps({"trial_id": "ab12cd34"}),
                                json.dumps({"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob}})]]}
    (tmp_path / "experiment_state-2026-01-01_00-00-01.json").write_text(json.dumps(snapshot))
    ExperimentFolder(named(tmp_path)).repair()
    for name in ("checkpoint_000000", "checkpoint_000001"):
        assert (trial / name / "pretrain_state.pt").read_text() == "5"  # the newest state, under the old name
        assert (trial / name / "sub" / "extra.txt").read_text() == "5"


def test_the_tuner_backup_and_the_space_are_written_whole(tmp_path: Path, named) -> None:
    folder = ExperimentFolder(named(tmp_path / "sweep"))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "tuner.pkl").write_bytes(b"state")
    folder.backup_tuner_state()
    folder.save_space({"trial": {"seed": 0}})
    assert (tmp_path / "sweep" / "r2sweep_tuner.pkl").read_bytes() == b"state"
    assert folder.saved_space() == {"trial": {"seed": 0}}
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["r2sweep_space.json", "r2sweep_tuner.pkl", "tuner.pkl"]
    assert ExperimentFolder(named(tmp_path / "elsewhere")).saved_space() is None


SPEC = tiny_sweep("on-uri")


@pytest.mark.ray
def test_a_sweep_on_a_storage_uri_is_resumed_only_with_its_own_space(tmp_path: Path) -> None:
    storage = (tmp_path / "shared").as_uri()
    (tmp_path / "shared").mkdir()
    spec = load_sweep_spec(SPEC)
    try:
        outcome = run_sweep(spec, storage=storage, num_cpus=2)
        assert len(outcome.finished()) == 2
        assert outcome.path == f"{storage}/on-uri"
        saved = json.loads((tmp_path / "shared" / "on-uri" / "r2sweep_space.json").read_text())
        assert saved["search"]["train.lr"]["values"] == [0.01, 0.1]
        assert (tmp_path / "shared" / "on-uri" / "r2sweep_tuner.pkl").is_file()

        other = load_sweep_spec(yaml.safe_load(yaml.safe_dump({**SPEC, "search": {"train.lr": {"loguniform": [0.01, 0.2]}}})))
        with pytest.raises(ConfigError, match=r"search\.train\.lr\.values=.* the sweep at file://.* was started with \[0\.01, 0\.1\]"):
            run_sweep(other, storage=storage, resume=True)
        resumed = run_sweep(spec, storage=storage, resume=True)  # the same space: Tune's state is read back
        assert len(resumed.finished()) == 2
    finally:
        ray.shutdown()

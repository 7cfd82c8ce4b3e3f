"""The files r2sweep keeps in a Tune experiment folder: local or at a storage URI.

Every case runs twice: on a local folder and on the same folder named by a
``file://`` URI, which goes through pyarrow's URI file system exactly as an
``s3://`` or ``gs://`` storage would (the code path used to be skipped for any
``--storage`` URI: no resume check, no repairs). The repairs of Tune's own
files are tested in test_state_repairs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from conftest import tiny_sweep

from r2sweep.core.config.record import read_record, sweep_mapping, sweep_record
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.errors import ConfigError
from r2sweep.tune.experiment_files import ExperimentFolder
from r2sweep.tune.tuner import check_experiment, run_experiment


@pytest.fixture(params=["path", "uri"])
def named(request):
    """How the experiment folder is named: ``str(path)`` or ``file://path``."""
    return (lambda path: str(path)) if request.param == "path" else (lambda path: Path(path).as_uri())


def test_the_record_is_written_whole(tmp_path: Path, named) -> None:
    folder = ExperimentFolder(named(tmp_path / "sweep"))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "tuner.pkl").write_bytes(b"state")
    text = sweep_record(load_sweep_spec(SPEC))
    folder.save_record(text)
    assert folder.saved_record() == text and sweep_record(read_record(text)) == text  # read back as it is
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["sweep.yaml", "tuner.pkl"]
    assert ExperimentFolder(named(tmp_path / "elsewhere")).saved_record() is None


def test_children_and_copy_tree_work_on_the_folder_s_file_system(tmp_path: Path, named) -> None:
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "sub" / "f.txt").write_text("x")
    (tmp_path / "a.txt").write_text("a")
    folder = ExperimentFolder(named(tmp_path))
    assert [i.base_name for i in folder.children()] == ["a.txt", "b"]
    assert folder.children("missing") == []
    folder.copy_tree(folder.path("b"), folder.path("c"))
    assert (tmp_path / "c" / "sub" / "f.txt").read_text() == "x"


SPEC = tiny_sweep("on-uri")


@pytest.mark.ray
def test_a_sweep_on_a_storage_uri_is_resumed_only_with_its_own_space(tmp_path: Path) -> None:
    storage = (tmp_path / "shared").as_uri()
    (tmp_path / "shared").mkdir()
    spec = load_sweep_spec(SPEC)
    try:
        outcome = run_experiment(spec, storage=storage, num_cpus=2)
        assert len(outcome.finished()) == 2
        assert outcome.path == f"{storage}/on-uri"
        saved = yaml.safe_load((tmp_path / "shared" / "on-uri" / "sweep.yaml").read_text())
        assert saved["search"]["train.lr"]["loguniform"] == [0.01, 0.1]
        assert (tmp_path / "shared" / "on-uri" / "r2sweep_tuner.pkl").is_file()

        other = load_sweep_spec(yaml.safe_load(yaml.safe_dump({**SPEC, "search": {"train.lr": {"loguniform": [0.01, 0.2]}}})))
        with pytest.raises(ConfigError, match=r"search\.train\.lr\.loguniform=.* the sweep at file://.* was started with \[0\.01, 0\.1\]"):
            run_experiment(other, storage=storage, resume=True)
        resumed = run_experiment(spec, storage=storage, resume=True)  # the same space: Tune's state is read back
        assert len(resumed.finished()) == 2
    finally:
        ray.shutdown()


def test_a_record_without_a_later_field_resumes_and_a_changed_value_is_still_refused(tmp_path: Path, named) -> None:
    """A later r2sweep adds fields with defaults (PTQ's ``fisher``, ``act_lr``, ``drop_prob``); a record
    written before lacks them. Read back, it is the same spec, so the resume goes on; a value that
    really changed is still refused, and a folder with no record at all is refused with the fix."""
    spec = load_sweep_spec({**tiny_sweep("older"), "downstream": [
        {"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "adaround_iters": 20}],
        "objective": {"metric": "ptq_adaround_w2a8/top1"}})
    older = sweep_mapping(spec)
    for field in ("fisher", "act_lr", "drop_prob"):
        del older["downstream"][0][field]
    del older["sweep"]["max_failures"]
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "tuner.pkl").write_bytes(b"state")  # what Tune's can_restore looks for
    with pytest.raises(ConfigError, match="the folder has no sweep.yaml"):
        check_experiment(spec, named(tmp_path / "older"), resume=True)
    ExperimentFolder(named(tmp_path / "older")).save_record(yaml.safe_dump(older))
    check_experiment(spec, named(tmp_path / "older"), resume=True)

    older["downstream"][0]["adaround_iters"] = 40
    ExperimentFolder(named(tmp_path / "older")).save_record(yaml.safe_dump(older))
    with pytest.raises(ConfigError, match=r"downstream=.*was started with .*'adaround_iters': 40"):
        check_experiment(spec, named(tmp_path / "older"), resume=True)

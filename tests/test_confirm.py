"""``r2sweep confirm``: a real tiny sweep's top trials re-run on fresh seeds as Ray tasks, logged to MLflow."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import ray
import yaml
from conftest import run_tracked_sweeps

from r2sweep.analysis.compare import compare_sweeps
from r2sweep.analysis.confirm import TAG_CONFIRM_OF, TAG_CONFIRMED_BEST, confirm_top
from r2sweep.analysis.select import read_sweep
from r2sweep.cli.app import main
from r2sweep.tracking.store import TAG_TRIAL_ID, Tracker

pytestmark = pytest.mark.ray

OBJECTIVE = "ptq_rtn_w4a8/top1"
SWEEP = {
    "name": "confirm-me",
    "seed": 0,
    "data": {"name": "synthetic", "num_samples": 128},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "batch_size": 32},
    "r2": {"kind": "none"},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": OBJECTIVE, "mode": "max"},
    "search": {"r2.kind": {"choice": ["none", "linf"]},
               "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": ["linf"]}},
               "train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "sampler": "random", "scheduler": "none"},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_tracked_sweeps(tmp_path_factory.mktemp("confirm"), SWEEP)


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_confirm_reruns_the_top_trials_logs_them_and_resumes(store: Path, tmp_path: Path, local_ray) -> None:
    tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}")
    sweep, _ = read_sweep(tracker, "confirm-me")
    trials = sweep.trial_runs()
    ranked = sorted(trials, key=lambda r: (r.data.metrics[OBJECTIVE], r.data.metrics["fp/top1"]), reverse=True)
    before = compare_sweeps(tracker, ["confirm-me"])

    lines: list[str] = []
    out = tmp_path / "confirmed.yaml"
    confirmations = confirm_top(tracker, "confirm-me", top=2, seeds=[0, 1], out=out, progress=lines.append)

    # The two best trials, each re-run on both seeds: seed 0 is the sweep's own seed,
    # so its re-run reproduces the trial exactly (CPU, one thread).
    assert {c.trial_id for c in confirmations} == {r.data.tags[TAG_TRIAL_ID] for r in ranked[:2]}
    for c in confirmations:
        trial = next(r for r in trials if r.data.tags[TAG_TRIAL_ID] == c.trial_id)
        assert set(c.values) == {0, 1}
        assert c.values[0] == pytest.approx(trial.data.metrics[OBJECTIVE]) == pytest.approx(c.sweep_value)
        assert c.fp[0] == pytest.approx(trial.data.metrics["fp/top1"])
        assert c.mean == pytest.approx(statistics.fmean(c.values.values()))
    assert confirmations[0].mean >= confirmations[1].mean  # best mean first
    # First what the re-runs will import (the stored configs name it), then the plan, then one line per re-run.
    assert lines[0].startswith("confirm confirm-me: the re-runs import r2sweep's own models and datasets only, "
                               "as the configs stored in sqlite:")
    assert len(lines) == 2 + 4 and lines[1].startswith("confirm confirm-me: 4 re-runs")

    # In MLflow: four finished re-runs under the sweep, tagged with the trial they re-run,
    # never counted as trials (compare's numbers are unchanged).
    reruns = sweep.confirm_runs()
    assert len(reruns) == 4 and all(r.info.status == "FINISHED" for r in reruns)
    for r in reruns:
        c = next(c for c in confirmations if c.trial_id == r.data.tags[TAG_CONFIRM_OF])
        seed = int(r.data.params["seed"])
        assert r.data.metrics[OBJECTIVE] == pytest.approx(c.values[seed])
        # The pre-training cache of the storage the sweep ran in is shared: the sweep's own seed was
        # pre-trained by the trial (a hit, reproducing it exactly, checked above); a new seed stores.
        assert r.data.tags["r2sweep.pretrain_cache"] == ("hit" if seed == 0 else "stored"), (seed, r.data.tags)
    assert len(sweep.trial_runs()) == len(trials)
    assert compare_sweeps(tracker, ["confirm-me"])[0].finished == before[0].finished
    parent = tracker.client.get_run(sweep.parent_run_id)
    assert parent.data.tags[TAG_CONFIRMED_BEST] == confirmations[0].trial_id
    written = yaml.safe_load(out.read_text())
    winner = next(r for r in trials if r.data.tags[TAG_TRIAL_ID] == confirmations[0].trial_id)
    assert written["train"]["lr"] == pytest.approx(float(winner.data.params["train.lr"]))

    # Again, with one more seed: only the new seed runs; the rest comes from MLflow.
    lines.clear()
    again = confirm_top(tracker, "confirm-me", top=2, seeds=[0, 1, 2], progress=lines.append)
    assert lines[1].startswith("confirm confirm-me: 2 re-runs") and len(sweep.confirm_runs()) == 6
    assert {c.trial_id: (c.values[0], c.values[1]) for c in again} == {c.trial_id: (c.values[0], c.values[1])
                                                                       for c in confirmations}


def test_cli_prints_the_table_and_bad_input_is_one_line(store: Path, monkeypatch, capsys, local_ray) -> None:
    monkeypatch.chdir(store)
    # Everything already in MLflow from the test above (or run now, if it ran alone).
    assert main(["confirm", "confirm-me", "--top", "1", "--seeds", "0"]) == 0
    output = capsys.readouterr().out
    assert "confirmed best: trial" in output and "(the sweep saw" in output
    assert (store / "confirm-me-confirmed.yaml").is_file()
    for argv, message in [(["confirm", "confirm-me", "--top", "0"], "--top 0: must be at least 1"),
                          (["confirm", "confirm-me", "--seeds", "1", "1"], "seed 1 is given twice"),
                          (["confirm", "confirm-mee"], "did you mean 'confirm-me'")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_any_configuration_reruns_on_seeds_under_its_own_key_and_resumes(store: Path, local_ray) -> None:
    # A study's control: the sweep's best trial with R2 switched off, on two seeds.
    from r2sweep.analysis.confirm import Rerun, logged_trial_config, run_reruns

    tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}")
    sweep, spec = read_sweep(tracker, "confirm-me")
    best = max(sweep.trial_runs(), key=lambda r: spec.ranking(r.data.metrics))
    asked: list[str] = []

    def config() -> dict:
        asked.append("config")
        return {**logged_trial_config(sweep, best.info.run_id), "r2": {"kind": "none"}}

    params = {**best.data.params, "r2.kind": "none"}
    params.pop("r2.strength", None)
    control = Rerun(key=f"{best.data.tags[TAG_TRIAL_ID]}-r2off", config=config, params=params,
                    tags={"r2sweep.control": "r2_off"})
    lines: list[str] = []
    first = run_reruns(sweep, spec, [control], [0, 1], label="control", progress=lines.append)
    assert set(first[control.key]) == {0, 1} and lines[1].startswith("control: 2 re-runs")
    runs = [r for r in sweep.confirm_runs() if r.data.tags.get("r2sweep.control") == "r2_off"]
    assert sorted(r.data.tags[TAG_TRIAL_ID] for r in runs) == [f"{control.key}-seed0", f"{control.key}-seed1"]
    assert all(r.data.params["r2.kind"] == "none" and "r2.strength" not in r.data.params for r in runs)
    for run in runs:
        assert run.data.metrics[OBJECTIVE] == first[control.key][int(run.data.params["seed"])][OBJECTIVE]
    # Again: everything comes from MLflow; the config is not even read.
    again = run_reruns(sweep, spec, [control], [0, 1], progress=lines.append)
    assert asked == ["config"] and {s: m[OBJECTIVE] for s, m in again[control.key].items()} == \
        {s: m[OBJECTIVE] for s, m in first[control.key].items()}


def test_a_stored_config_whose_code_does_not_import_is_refused_before_any_rerun(store: Path) -> None:
    # What the store names is imported only by a command that runs it, and checked before it starts.
    from r2sweep.analysis.confirm import Rerun, logged_trial_config, run_reruns
    from r2sweep.core.errors import ConfigError

    tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}")
    sweep, spec = read_sweep(tracker, "confirm-me")
    best = max(sweep.trial_runs(), key=lambda r: spec.ranking(r.data.metrics))
    stored = logged_trial_config(sweep, best.info.run_id)
    moved = Rerun(key="moved", config=lambda: {**stored, "model": {"factory": "gone_module:build"}}, params={}, tags={})
    before = len(sweep.confirm_runs())
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"model\.factory='gone_module:build'.*No module named 'gone_module'"):
        run_reruns(sweep, spec, [moved], [0], label="moved", progress=lines.append)
    assert lines == [f"moved: the re-runs import model.factory 'gone_module:build', as the configs stored in "
                     f"{tracker.display_uri} name them"]
    assert len(sweep.confirm_runs()) == before  # no run was created, no Ray started

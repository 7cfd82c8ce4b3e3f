"""The Python API: the README's tour runs as written, and it agrees with the CLI.

The tour (the code between the README's ``tour`` markers) runs in-process, as a
notebook would, on the quickstart file shrunk by its own overrides; its
``result.best`` must be what ``r2sweep best`` then picks from MLflow. The
refusals below need no Ray: bad arguments are refused, naming the argument,
before anything is created.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import new_mlflow_store

import r2sweep
from r2sweep.core.errors import ConfigError, FileConfigError

REPO = Path(__file__).resolve().parents[1]


def _tour() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- tour:start -->\s*```python\n(.*?)```\s*<!-- tour:end -->", text, re.S)
    assert block, "README.md lost its tour block (<!-- tour:start --> ```python ... ``` <!-- tour:end -->)"
    return block.group(1)


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory):
    import ray

    work = tmp_path_factory.mktemp("tour")
    (work / "search_spaces").symlink_to(REPO / "search_spaces")
    (work / "tour.py").write_text(_tour())
    new_mlflow_store(work / "mlflow.db")  # the tour's default store, sqlite:///mlflow.db
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cwd = Path.cwd()
    os.chdir(work)
    try:
        names = runpy.run_path(str(work / "tour.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
        ray.shutdown()
    return work, names["result"]


@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_tour_picks_what_r2sweep_best_picks(tour) -> None:
    work, result = tour
    done = subprocess.run([sys.executable, "-m", "r2sweep.cli", "best", "quickstart", "--no-register", "--out", "cli.yaml"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"best run {result.best.run_id} (trial {result.best.trial_id})" in done.stdout
    assert (work / "cli.yaml").read_text() == result.best.config_path.read_text()
    assert result.best.config_path == work / "r2sweep_results" / "quickstart" / "best.yaml"
    assert result.best.model_version == "1"  # run_sweep registered the champion
    assert r2sweep.load_trial_config(result.best.config_path).to_mapping() == result.best.config


@pytest.mark.ray
@pytest.mark.slow
def test_the_tour_result_has_one_row_per_trial_with_its_sampled_values_and_outcome(tour) -> None:
    work, result = tour
    trials = result.trials
    assert len(trials) == 2 and set(trials["outcome"]) <= {"finished", "stopped", "diverged", "failed"}
    assert trials["trial_id"].is_unique and trials["run_id"].is_unique
    assert {"config/r2.kind", "config/train.lr", result.objective, "fp/top1"} <= set(trials.columns)
    # The first trial is the no-R2 baseline r2sweep enqueues; its strength was never sampled.
    assert "none" in set(trials["config/r2.kind"])
    assert trials.loc[trials["config/r2.kind"] == "none", "config/r2.strength"].isna().all()
    assert all(0.005 <= lr <= 0.05 for lr in trials["config/train.lr"])
    best_row = trials.set_index("run_id").loc[result.best.run_id]
    assert best_row[result.objective] == result.best.metrics[result.objective]
    assert result.experiment_id and result.spec.name == "quickstart" and result.tune_results is not None
    assert (work / "quickstart-report" / "index.html").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_the_sweeps_optuna_study_holds_its_trials_as_mlflow_has_them(tour) -> None:
    import optuna

    from r2sweep.core.outcome import FINISHED

    work, result = tour
    url = f"sqlite:///{work}/r2sweep_results/quickstart/optuna.db"
    assert result.optuna_storage == url  # what optuna-dashboard opens
    assert r2sweep.load_sweep("quickstart", tracking_uri=f"sqlite:///{work}/mlflow.db").optuna_storage == url
    study = optuna.load_study(study_name="quickstart", storage=url)  # Optuna's own API, from the file
    rows = result.trials.set_index("trial_id")
    assert len(study.trials) == len(rows) and {t.user_attrs["tune_trial_id"] for t in study.trials} == set(rows.index)
    client = result._tracker.client
    for trial in study.trials:
        row = rows.loc[trial.user_attrs["tune_trial_id"]]
        assert trial.user_attrs["mlflow_run_id"] == row["run_id"] and trial.user_attrs["outcome"] == row["outcome"]
        assert trial.params["r2.kind"] == row["config/r2.kind"] and trial.params["train.lr"] == row["config/train.lr"]
        if row["outcome"] == FINISHED:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == row[result.objective]
        else:
            assert trial.state in (optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        proxies = {m.step: m.value for m in client.get_metric_history(row["run_id"], "proxy/top1")}
        assert trial.intermediate_values == proxies and proxies  # the per-epoch proxy ASHA ranked on


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_run_of_the_same_name_is_refused_and_a_resume_needs_the_same_space(tour) -> None:
    work, _ = tour
    cwd = Path.cwd()
    os.chdir(work)
    try:
        with pytest.raises(FileExistsError, match="add --resume"):
            r2sweep.prepare_sweep("search_spaces/quickstart.yaml",
                                  overrides={"sweep.num_samples": 2, "sweep.scheduler": "none", "train.epochs": 1})
        with pytest.raises(ConfigError, match="sweep.num_samples"):
            r2sweep.prepare_sweep("search_spaces/quickstart.yaml", resume=True,
                                  overrides={"sweep.num_samples": 3, "sweep.scheduler": "none", "train.epochs": 1})
    finally:
        os.chdir(cwd)


# --- --start-from: an earlier sweep's best first (the tour's sweep is the earlier one) -------------


def _quickstart(search: dict | None = None, **sweep) -> "r2sweep.SweepSpec":
    import yaml

    raw = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    raw["search"] = search or raw["search"]
    raw["sweep"] = {**raw["sweep"], **sweep}
    return r2sweep.load_sweep_spec(raw)


def _ranked(result) -> list[dict]:
    """The trials best first by `best`'s rule, ties in MLflow's order (as --start-from ranks them)."""
    rows = result.trials.to_dict("records")
    return sorted(rows, key=lambda row: (row[result.objective], row["fp/top1"]), reverse=True)


def _ranked_lrs(result) -> list[float]:
    return [row["config/train.lr"] for row in _ranked(result)]


@pytest.mark.ray
@pytest.mark.slow
def test_start_from_maps_the_earlier_best_onto_another_space_with_notes(tour) -> None:
    from r2sweep.analysis.start_from import start_from

    work, result = tour
    tracker = result._tracker
    lr_only = _quickstart({"train.lr": {"loguniform": [0.005, 0.05]}})
    lent = start_from(tracker, "quickstart", lr_only, top=2)
    assert [p["train.lr"] for p in lent.points] == _ranked_lrs(result)  # best first, searched values only
    assert lent.history == ()  # the spaces differ: nothing given to Optuna as history
    assert lent.notes == ("not searched here, so left out: r2.kind, r2.margin_init, r2.strength",)
    narrow = start_from(tracker, "quickstart", _quickstart({"train.lr": {"loguniform": [1e-4, 1e-3]}}), top=2)
    assert narrow.points == () and len(narrow.notes) == 3
    assert all("not tried: train.lr=" in note and "range [0.0001, 0.001]" in note for note in narrow.notes[1:])
    with pytest.raises(ConfigError, match="^start_from='quickstart' is not valid: a sweep that searches some"):
        start_from(tracker, "quickstart", _quickstart({"train.batch_size": {"choice": [32, 64]}}), top=2)
    with pytest.raises(ConfigError, match="^start_from='quickstrat' is not valid: a sweep in the tracking store"):
        start_from(tracker, "quickstrat", lr_only, top=2)
    same = start_from(tracker, "quickstart", _quickstart(), top=1)
    assert len(same.points) == 1 and len(same.history) == len(result.trials)  # the same space: history too


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_started_from_another_runs_its_best_first_and_optuna_knows_its_trials(tour) -> None:
    from ray.tune.search.optuna import OptunaSearch

    from r2sweep.cli.app import main
    from r2sweep.tracking.names import TAG_START_FROM

    work, earlier = tour
    cwd = Path.cwd()
    os.chdir(work)
    try:
        lines: list[str] = []
        warm = r2sweep.run_sweep("search_spaces/quickstart.yaml", name="warm", start_from="quickstart", start_top=2,
                                 overrides={"sweep.num_samples": 2, "sweep.scheduler": "none", "train.epochs": 1,
                                            "sweep.baseline": False},
                                 register=False, progress=lines.append)
        # Nothing in common: exit 2 with one line, before Ray starts.
        (work / "other.yaml").write_text("name: other\ndata: {name: digits}\nmodel: {name: small_cnn}\n"
                                         "objective: {metric: fp/top1}\nsearch: {train.batch_size: {choice: [32, 64]}}\n")
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(["sweep", "other.yaml", "--start-from", "quickstart"])
    finally:
        os.chdir(cwd)
        import ray

        ray.shutdown()
    assert status == 2 and err.getvalue().count("\n") == 1 and "--start-from='quickstart'" in err.getvalue()
    assert "warm: start from sweep quickstart: its top 2 configuration(s) first (of --top 2); its 2 trials given " \
           "to Optuna as history" in lines
    # Creation order: Tune's trial folders are trainable_<id>_<creation index>_...
    created = sorted(warm.tune_results, key=lambda r: int(Path(r.path).name.split("_")[2]))
    paths = ["r2.kind", "r2.strength", "train.lr"]
    assert [[r.config.get(p) for p in paths] for r in created] == \
        [[None if row[f"config/{p}"] is None or row[f"config/{p}"] != row[f"config/{p}"] else row[f"config/{p}"]
          for p in paths] for row in _ranked(earlier)]
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(work / "r2sweep_results" / "warm"))
    states = [t.state.name for t in searcher._ot_study.trials]
    assert states == ["COMPLETE"] * 4  # the earlier two as history, then the two re-runs
    # (history comes in MLflow's search order, which ties in start time leave open: compared as a set)
    assert sorted(t.value for t in searcher._ot_study.trials[:2]) == sorted(earlier.trials[earlier.objective])
    parent = warm._tracker.client.get_run(warm._tracker.find_sweep("warm").parent_run_id)
    assert parent.data.tags[TAG_START_FROM] == "quickstart (top 2: 2 tried first, 2 as history)"


# --- refusals before anything starts --------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "starts"),
    [
        ({"storage": ""}, "storage='': an empty path"),
        ({"tracking_uri": "ftp://host/x"}, "tracking_uri=ftp://host/x: "),
        ({"name": "a/b"}, "name=a/b: "),
        ({"address": "http://host:8265"}, "address=http://host:8265: a web address"),
        ({"overrides": ["train.epochs"]}, "tiny.yaml: overrides='train.epochs' is not valid: PATH=VALUE"),
        ({"overrides": ["train.lr=[0.1"]}, "tiny.yaml: overrides['train.lr']='[0.1' is not valid: a YAML value"),
        ({"overrides": {"train.epochs": "ten"}}, "tiny.yaml: train.epochs='ten'"),
        ({"overrides": {"r2.margin_init": "3std"}},
         "tiny.yaml: overrides['r2.margin_init']='3std' is not valid: a field some trial of the sweep reads"),
        ({"overrides": {"train.lr": 0.05}}, "tiny.yaml: overrides['train.lr']=0.05 is not valid: a field the search "
                                            "leaves alone"),
    ],
)
def test_bad_arguments_are_refused_naming_them_and_nothing_is_created(tmp_path: Path, monkeypatch, arguments, starts) -> None:
    import yaml

    from conftest import tiny_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    Path("tiny.yaml").write_text(yaml.safe_dump(tiny_sweep("tiny")))
    with pytest.raises(ConfigError) as refused:
        r2sweep.run_sweep("tiny.yaml", **arguments)
    assert str(refused.value).startswith(starts), str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no store, no results folder


def test_a_file_error_names_the_file_and_keeps_the_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("train: {epochs: 0}\n")
    with pytest.raises(FileConfigError) as refused:
        r2sweep.load_sweep_spec(tmp_path / "bad.yaml")
    assert str(refused.value).startswith(f"{tmp_path / 'bad.yaml'}: ") and refused.value.field == "train.epochs"
    with pytest.raises(TypeError, match="not a SweepSpec"):
        r2sweep.run_sweep(r2sweep.load_sweep_spec({"objective": {"metric": "fp/top1"}}))


def test_importing_r2sweep_loads_no_ray_or_mlflow_and_every_public_name_resolves() -> None:
    code = ("import sys, r2sweep; loaded = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'optuna'}); "
            "missing = [n for n in r2sweep.__all__ if getattr(r2sweep, n, None) is None]; print(loaded, missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_run_trial_keeps_its_config_and_metrics_and_refuses_another_config_in_the_folder(tmp_path: Path) -> None:
    trial = {"data": {"name": "synthetic", "num_samples": 64}, "model": {"name": "small_cnn", "width": 0.25},
             "train": {"epochs": 1, "batch_size": 32}, "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": 4}]}
    lines: list[str] = []
    metrics = r2sweep.run_trial(trial, out_dir=tmp_path / "run", progress=lines.append)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)
    assert r2sweep.load_trial_config(tmp_path / "run" / "config.yaml") == r2sweep.load_trial_config(trial)
    assert 0 <= metrics["ptq_rtn_w4a8/top1"] <= 100 and any("epoch 1/1" in line for line in lines)
    with pytest.raises(ConfigError, match="out_dir=.*different trial config"):
        r2sweep.run_trial(trial, overrides={"seed": 7}, out_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^overrides\['r2.strength'\]=0.1 is not valid: .* drop the override"):
        r2sweep.run_trial(trial, overrides={"r2.strength": 0.1}, out_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()

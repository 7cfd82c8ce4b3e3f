"""`r2sweep sweep` and `r2sweep best` end to end: real Ray, a real MLflow store, real training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import cli_main, new_mlflow_store

pytestmark = pytest.mark.ray

SPEC = {
    "name": "cli-tiny",
    "data": {"name": "synthetic", "num_samples": 256},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "batch_size": 32},
    "r2": {"kind": "none"},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2]}],
    "objective": {"metric": "ptq_rtn_w2a8/top1", "mode": "max"},
    "search": {
        "r2.kind": {"choice": ["none", "linf"]},
        "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": "linf"}},
        "train.lr": {"loguniform": [0.02, 0.2]},
    },
    "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "scheduler": "none", "resources_per_trial": {"cpu": 1}},
}


def _r2sweep(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "r2sweep.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("sweep-cli")
    (work / "tiny.yaml").write_text(yaml.safe_dump(SPEC))
    new_mlflow_store(work / "mlflow.db")  # the command's default store
    done = _r2sweep("sweep", "tiny.yaml", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done


def _client(work: Path):
    return mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def test_sweep_logs_one_parent_and_one_child_per_trial(finished_sweep) -> None:
    work, done = finished_sweep
    client = _client(work)
    experiment = client.get_experiment_by_name("cli-tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("r2sweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("r2sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == SPEC["sweep"]["num_samples"]
    assert len({r.data.tags["r2sweep.trial_id"] for r in children}) == len(children)
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        params = run.data.params
        # Exactly the sampled parameters, under their dotted paths, conditionals only where they apply.
        assert set(params) == ({"r2.kind", "train.lr", "r2.strength"} if params["r2.kind"] == "linf" else {"r2.kind", "train.lr"})
        history = client.get_metric_history(run.info.run_id, "val/top1")
        assert sorted(m.step for m in history) == [0, 1]
        assert 0 <= run.data.metrics["ptq_rtn_w2a8/top1"] <= 100
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"trial_config.yaml", "weights.png", "pretrained.pt"} <= artifacts
    assert parents[0].info.status == "FINISHED"
    assert "sweep cli-tiny" in done.stderr and "best ptq_rtn_w2a8/top1" in done.stderr
    assert "mlflow ui --backend-store-uri" in done.stdout


def test_best_config_reruns_to_the_same_accuracy_and_is_the_champion(finished_sweep) -> None:
    work, _ = finished_sweep
    client = _client(work)
    best_path = work / "r2sweep_results" / "cli-tiny" / "best.yaml"
    assert best_path.exists()
    experiment = client.get_experiment_by_name("cli-tiny")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("r2sweep.role") == "trial"]
    best_run = max(children, key=lambda r: (r.data.metrics["ptq_rtn_w2a8/top1"], r.data.metrics["fp/top1"]))
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("r2sweep.role") == "sweep")
    assert parent.data.tags["r2sweep.best_run_id"] == best_run.info.run_id
    version = client.get_model_version_by_alias("r2sweep-cli-tiny", "champion")
    assert version.run_id == best_run.info.run_id

    rerun = _r2sweep("trial", str(best_path), "--out", "rerun", cwd=work)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    metrics = json.loads((work / "rerun" / "metrics.json").read_text())
    assert metrics["fp/top1"] == pytest.approx(best_run.data.metrics["fp/top1"], abs=1.0)
    assert metrics["ptq_rtn_w2a8/top1"] == pytest.approx(best_run.data.metrics["ptq_rtn_w2a8/top1"], abs=2.0)

    again = _r2sweep("best", "cli-tiny", "--out", "again.yaml", cwd=work)
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load((work / "again.yaml").read_text()) == yaml.safe_load(best_path.read_text())
    # The champion did not change: no second model version of the same run.
    assert client.get_model_version_by_alias("r2sweep-cli-tiny", "champion").version == version.version
    assert len(client.search_model_versions("name='r2sweep-cli-tiny'")) == 1


def test_resume_continues_the_same_sweep_without_duplicate_runs(finished_sweep, monkeypatch, capsys) -> None:
    work, _ = finished_sweep
    here = {"cwd": work, "monkeypatch": monkeypatch, "capsys": capsys}
    again = _r2sweep("sweep", "tiny.yaml", cwd=work)  # a real process: its exit status and its stderr alone
    assert again.returncode == 2 and "add --resume" in again.stderr
    assert again.stderr.strip().count("\n") == 0, again.stderr  # the refusal alone: refused before the start line
    resumed = _r2sweep("sweep", "tiny.yaml", "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = _client(work)
    experiment = client.get_experiment_by_name("cli-tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len([r for r in runs if r.data.tags.get("r2sweep.role") == "sweep"]) == 1
    assert len([r for r in runs if r.data.tags.get("r2sweep.role") == "trial"]) == SPEC["sweep"]["num_samples"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # The other refusals through the CLI's main in this process (no Ray starts before a refusal).
    missing = cli_main("sweep", "tiny.yaml", "--resume", "--name", "never-ran", **here)
    assert missing.returncode == 2 and "no sweep to resume" in missing.stderr
    unknown = cli_main("best", "never-ran", **here)
    assert unknown.returncode == 2 and "no sweep named 'never-ran'" in unknown.stderr
    changed = cli_main("sweep", "tiny.yaml", "--resume", "--set", "train.epochs=7", **here)
    assert changed.returncode == 2, changed.stderr[-2000:]
    (line,) = [l for l in changed.stderr.splitlines() if l.startswith("r2sweep: error:")]
    assert "train.epochs=7" in line and "was started with" in line and "--name" in line
    # Tune resumes with the tracker the sweep started with: another store is refused, not half-used.
    elsewhere = cli_main("sweep", "tiny.yaml", "--resume", "--tracking-uri", "sqlite:///other.db", **here)
    assert elsewhere.returncode == 2, elsewhere.stderr[-2000:]
    (line,) = [l for l in elsewhere.stderr.splitlines() if l.startswith("r2sweep: error:")]
    assert "--tracking-uri" in line and f"resume it with --tracking-uri sqlite:///{work.resolve() / 'mlflow.db'}" in line
    assert not (work / "other.db").exists()


def test_a_name_whose_tune_state_is_gone_is_refused_not_merged(finished_sweep, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    """The sweep's store without its results folder (deleted, or on another machine): running
    the same name again used to log the new trials as children of the old parent run."""
    work, _ = finished_sweep
    shutil.copy2(work / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copy2(work / "tiny.yaml", tmp_path / "tiny.yaml")

    def runs() -> list[str]:
        client = _client(tmp_path)
        return sorted(r.info.run_id for r in client.search_runs([client.get_experiment_by_name("cli-tiny").experiment_id]))

    before = runs()
    again = cli_main("sweep", "tiny.yaml", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert again.returncode == 2, again.stderr[-2000:]
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("r2sweep: error: --name='cli-tiny' is not valid: a new sweep name: ")
    assert f"already holds sweep 'cli-tiny' ({SPEC['sweep']['num_samples']} trials" in line and "pass --name" in line
    assert not (tmp_path / "r2sweep_results").exists()
    assert runs() == before


def test_bad_spec_exits_2_and_creates_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = dict(SPEC, objective={"metric": "ptq_adaround_w2a8/top1", "mode": "max"})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    done = _r2sweep("sweep", "bad.yaml", cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "objective.metric" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    here = {"cwd": tmp_path, "monkeypatch": monkeypatch, "capsys": capsys}
    done = cli_main("sweep", "bad.yaml", "--set", "objective.metric=ptq_rtn_w2a8/top1", "--num-samples", "0", **here)
    assert done.returncode == 2 and "sweep.num_samples" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    done = cli_main("best", "nothing-here", **here)
    assert done.returncode == 2 and "no MLflow store at mlflow.db" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # reading never creates a store


def test_the_same_sweep_against_a_real_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    spec = dict(SPEC, name="served", sweep=dict(SPEC["sweep"], num_samples=2))
    (tmp_path / "served.yaml").write_text(yaml.safe_dump(spec))
    done = _r2sweep("sweep", "served.yaml", "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server
    assert "View run" not in done.stdout + done.stderr  # MLflow's per-run URL lines stay out of the progress
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("served")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("r2sweep.role") == "trial"]
    assert len([r for r in runs if r.data.tags.get("r2sweep.role") == "sweep"]) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" and "ptq_rtn_w2a8/top1" in r.data.metrics for r in children)
    assert {a.path for a in client.list_artifacts(children[0].info.run_id)} >= {"trial_config.yaml", "weights.png"}
    best = max(children, key=lambda r: (r.data.metrics["ptq_rtn_w2a8/top1"], r.data.metrics["fp/top1"]))
    assert client.get_model_version_by_alias("r2sweep-served", "champion").run_id == best.info.run_id

"""What a sweep leaves in the tracking store is data: read anywhere, executing nothing.

One real sweep (the ``r2sweep`` command, local Ray, a SQLite store) of a model
and a dataset defined in a module of its own folder, started from a checkpoint
there, with PTQ, QAT and DKM results. Then:

* read from another folder, by another process whose ``sys.path`` lacks the module
  and where the checkpoint is gone: ``best``, ``compare``, ``report``, ``load_sweep``
  and its Optuna view give the same answers as from the sweep's own folder;
* every place the store names a factory or model arguments (the sweep's record, each
  trial's config, its params, its ``pretrained.pt``, the pre-training cache's entry)
  rewritten to name a module whose import and call leave a mark: no reader, and
  no cache hit, runs it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import new_mlflow_store
from mlflow import MlflowClient

import r2sweep
from r2sweep.core.checkpoint import save_atomic
from r2sweep.core.pretrained_file import PRETRAINED
from r2sweep.tracking.names import SPEC_ARTIFACT, TAG_ROLE
from user_code import MODULE, write_user_module

pytestmark = pytest.mark.ray

NAME = "own-read"
SPEC = {
    "name": NAME,
    "data": {"factory": f"{MODULE}:load", "samples": 400},
    "model": {"factory": f"{MODULE}:build", "channels": 16, "init_from": "start.pt"},
    "train": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
    "downstream": [
        {"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "adaround_iters": 5, "calib_samples": 32},
        {"method": "qat", "algorithm": "lsq", "weight_bits": [2], "epochs": 1, "batch_size": 32},
        {"method": "dkm", "weight_bits": [1], "epochs": 1, "batch_size": 32},
    ],
    "objective": {"metric": "ptq_adaround_w2a8/top1", "mode": "max"},
    "search": {"r2.kind": {"choice": ["none", "linf"]},
               "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": ["linf"]}}},
    "sweep": {"num_samples": 3, "max_concurrent": 2, "seed": 0, "scheduler": "none", "resources_per_trial": {"cpu": 1}},
}
RESULTS = ("ptq_adaround_w2a8/top1", "qat_lsq_w2a8/top1", "dkm_w1/top1")
# Imported or called, it leaves a file: what the tampered store names.
EVIL = '''
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("imported")

def build(**options):
    Path(__file__).with_name("CALLED").write_text("called")
    raise SystemExit("called")

load = build
'''


def _r2sweep(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("r2sweep")), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


def _python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


LOAD_SWEEP = f"""
import json, r2sweep
result = r2sweep.load_sweep({NAME!r}, tracking_uri=URI)
trials = result.trials
study = result.optuna_study()  # the Optuna view: its storage holds values and distributions, no code
print(json.dumps({{"best": result.best.run_id, "metrics": result.best.metrics, "trials": len(trials),
                  "outcomes": sorted(trials["outcome"]), "params": [p.path for p in result.spec.params],
                  "optuna": sorted(str(t.params) for t in study.trials)}}, sort_keys=True))
"""


def _readings(cwd: Path, uri: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The four readers' answers from ``cwd``: their output, minus the paths that depend on it."""
    best = _r2sweep("best", NAME, "--tracking-uri", uri, "--out", "best.yaml", cwd=cwd, env=env)
    compare = _r2sweep("compare", NAME, "--tracking-uri", uri, "--format", "json", cwd=cwd, env=env)
    report = _r2sweep("report", NAME, "--tracking-uri", uri, "--out", "report", cwd=cwd, env=env)
    loaded = _python(f"URI = {uri!r}\n" + LOAD_SWEEP, cwd, env)
    for done in (best, compare, report, loaded):
        assert done.returncode == 0, done.args[:3] + [done.stderr[-2000:]]
    return {"best": best.stdout.replace(str(cwd), "<here>"), "best.yaml": (cwd / "best.yaml").read_text(),
            "compare": compare.stdout, "report": sorted(p.name for p in (cwd / "report").iterdir()),
            "load_sweep": loaded.stdout}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("store-is-data") / "work"
    write_user_module(work)
    sys.path.insert(0, str(work))
    try:
        from user_net import build  # the checkpoint the sweep starts from

        torch.manual_seed(0)
        torch.save(build(num_classes=10, in_channels=1, channels=16).state_dict(), work / "start.pt")
    finally:
        sys.path.remove(str(work))
        sys.modules.pop(MODULE, None)
    (work / "own.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    new_mlflow_store(work / "mlflow.db")
    done = _r2sweep("sweep", "own.yaml", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                              filter_string=f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:  # the user's model through every method
        assert all(0 <= run.data.metrics[m] <= 100 for m in RESULTS), run.data.metrics
        assert run.data.metrics["fp/top1"] > 30
        assert run.data.params["model.factory"] == "user_net:build" and run.data.params["data.factory"] == "user_net:load"
    assert (work / "r2sweep_results" / NAME / "best.yaml").is_file()
    return work


def test_a_sweep_of_ones_own_model_reads_the_same_where_its_code_and_checkpoint_are_not(swept: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{swept / 'mlflow.db'}"
    at_home = _readings(swept, uri)
    assert "champion: models:/r2sweep-own-read@champion (version 1)" in at_home["best"]
    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in (f"{MODULE}.py", "start.pt"):  # no module to import, no checkpoint to hash
        os.rename(swept / name, hidden / name)
    try:
        away = _readings(elsewhere, uri, env={"PYTHONPATH": ""})
    finally:
        for name in (f"{MODULE}.py", "start.pt"):
            os.rename(hidden / name, swept / name)
    assert away == at_home
    assert "weight_histograms.png" in away["report"]  # drawn from the logged tensors, no model built


def _tamper(work: Path, marks: Path) -> None:
    """Every stored factory reference and model-arguments record now names ``evil``."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    evil = {"model": {"factory": "evil:build", "channels": 16}, "data": {"factory": "evil:load"}}
    for run in runs:
        root = Path(run.info.artifact_uri.removeprefix("file://"))
        record = root / SPEC_ARTIFACT
        if record.is_file():
            record.write_text(yaml.safe_dump({**yaml.safe_load(record.read_text()), **evil}, sort_keys=False))
        config = root / "trial_config.yaml"
        if config.is_file():
            config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), **evil}, sort_keys=False))
        if (root / PRETRAINED).is_file():  # the form an older r2sweep rebuilt models from
            state = torch.load(root / PRETRAINED, weights_only=True)
            save_atomic({**state, "model_args": {"factory": "evil:build", "options": {}, "num_classes": 10,
                                                 "in_channels": 1, "input_size": 8}}, root / PRETRAINED)
    with sqlite3.connect(work / "mlflow.db") as db:  # MLflow's params are write-once through its API
        db.execute("UPDATE params SET value = 'evil:build' WHERE key = 'model.factory'")
        db.execute("UPDATE params SET value = 'evil:load' WHERE key = 'data.factory'")
    for manifest in (work / "r2sweep_results" / "pretrain_cache").rglob("manifest.json"):
        text = json.loads(manifest.read_text())
        text["material"]["model"]["factory"], text["material"]["data"]["factory"] = "evil:build", "evil:load"
        manifest.write_text(json.dumps(text))
    assert client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")


def test_a_store_rewritten_to_name_code_runs_none_of_it(swept: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marks = tmp_path / "evil"
    marks.mkdir()
    (marks / "evil.py").write_text(EVIL)
    real_config = yaml.safe_load((swept / "r2sweep_results" / NAME / "best.yaml").read_text())
    _tamper(swept, marks)
    uri = f"sqlite:///{swept / 'mlflow.db'}"
    reader = tmp_path / "reader"
    reader.mkdir()
    # evil is importable by every reader: had anything imported or called what the store names, it would show.
    _readings(reader, uri, env={"PYTHONPATH": str(marks)})
    assert not (marks / "IMPORTED").exists() and not (marks / "CALLED").exists()

    # A cache hit takes only tensors from the entry: the running trial's own config builds the model.
    monkeypatch.syspath_prepend(str(swept))
    monkeypatch.syspath_prepend(str(marks))
    try:
        metrics = r2sweep.run_trial(real_config, pretrain_cache=swept / "r2sweep_results" / "pretrain_cache")
    finally:
        sys.modules.pop(MODULE, None)
    assert metrics["pretrain_cache"] == "hit"
    assert not (marks / "IMPORTED").exists() and not (marks / "CALLED").exists()

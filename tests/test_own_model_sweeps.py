"""Real sweeps of the user's own model and data from Python, with callables and a checkpoint, and
with PTQ, QAT and DKM results in MLflow. (From a YAML file through the ``r2sweep`` command, and read
where its code is not: tests/test_store_is_data.py; the same module on a multi-node cluster, shipped
by the runtime environment: tests/test_cluster.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch
import yaml
from conftest import new_mlflow_store

import r2sweep
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.warm_start import file_sha256
from r2sweep.tracking.store import TAG_ROLE
from r2sweep.tune.callbacks import TAG_NOTES
from r2sweep.tune.runtime_env import runtime_env_for
from user_code import MODULE, write_user_module

pytestmark = pytest.mark.ray

DOWNSTREAM = [
    {"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "adaround_iters": 5, "calib_samples": 32},
    {"method": "qat", "algorithm": "lsq", "weight_bits": [2], "epochs": 1, "batch_size": 32},
    {"method": "dkm", "weight_bits": [1], "epochs": 1, "batch_size": 32},
]
RESULTS = ("ptq_adaround_w2a8/top1", "qat_lsq_w2a8/top1", "dkm_w1/top1")
SPEC = {
    "name": "own-model",
    "data": {"factory": f"{MODULE}:load", "samples": 400},
    "model": {"factory": f"{MODULE}:build", "channels": 16},
    "train": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
    "r2": {"kind": "margin", "strength": 0.01},
    "downstream": DOWNSTREAM,
    "objective": {"metric": "ptq_adaround_w2a8/top1", "mode": "max"},
    "search": {"r2.strength": {"loguniform": [1e-3, 1e-1]}},
    "sweep": {"num_samples": 2, "max_concurrent": 2, "seed": 0, "scheduler": "none", "resources_per_trial": {"cpu": 1}},
}


def _r2sweep(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (it does not put the working directory on sys.path by itself)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([str(Path(sys.executable).with_name("r2sweep")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _trial_runs(tracking_uri: str, name: str) -> list:
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")


@pytest.mark.parametrize("problem", ["wrong_architecture", "not_a_checkpoint"])
def test_a_bad_checkpoint_is_exit_2_before_ray_starts(tmp_path: Path, problem: str) -> None:
    if problem == "wrong_architecture":
        torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "ckpt.pt")
        expected = "a checkpoint of this model: none of its tensors fit"
    else:
        (tmp_path / "ckpt.pt").write_bytes(b"\x00not a checkpoint\n")
        expected = "a checkpoint torch.load reads"
    spec = {**SPEC, "data": {"name": "digits"}, "model": {"name": "small_cnn", "init_from": "ckpt.pt"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    done = _r2sweep("sweep", "bad.yaml", cwd=tmp_path, timeout=180)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "model.init_from=" in done.stderr and expected in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "ckpt.pt"]  # no store, no results, no Ray


def test_a_python_sweep_with_callables_and_a_checkpoint(tmp_path: Path) -> None:
    # Defined here, not in a module: Ray ships them with the trials by value.
    def load_arrays(*, seed, samples=300):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, samples)
        images = rng.normal(0, 0.3, (samples, 2, 6, 6)).astype(np.float32) + labels[:, None, None, None]
        cut = samples * 3 // 4
        return {"train": (images[:cut], labels[:cut]), "val": (images[cut:], labels[cut:]), "num_classes": 4}

    class BranchingNet(torch.nn.Module):
        """A grouped conv and SiLU, and a data-dependent branch that torch.fx cannot trace."""

        def __init__(self, num_classes, in_channels, width):
            super().__init__()
            self.stem = torch.nn.Conv2d(in_channels, width, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(width)
            self.grouped = torch.nn.Conv2d(width, width, 3, padding=1, groups=2)
            self.head = torch.nn.Linear(width * 36, num_classes)

        def forward(self, x):
            x = torch.nn.functional.silu(self.bn(self.stem(x)))
            if x.abs().amax() > 1e6:  # never true; only data decides, so fx refuses to trace
                x = x / x.abs().amax()
            return self.head(torch.nn.functional.silu(self.grouped(x)).flatten(1))

    def grouped_net(*, num_classes, in_channels, width=8):
        return BranchingNet(num_classes, in_channels, width)

    checkpoint = tmp_path / "start.pt"
    torch.manual_seed(0)
    torch.save(grouped_net(num_classes=4, in_channels=2).state_dict(), checkpoint)
    spec = {**SPEC, "name": "own-callables", "data": {"factory": load_arrays},
            "model": {"factory": grouped_net, "init_from": str(checkpoint)}}
    if ray.is_initialized():
        ray.shutdown()
    try:
        result = r2sweep.run_sweep(spec, tracking_uri=new_mlflow_store(tmp_path / "mlflow.db"), storage=tmp_path / "results",
                                   progress=False)
    except BaseException:
        ray.shutdown()
        raise
    assert (result.trials["outcome"] == "finished").sum() == 2
    assert all(result.trials[m].between(0, 100).all() for m in RESULTS)
    assert result.trials["fp/top1"].min() > 40  # four well-separated classes, from a checkpoint
    runs = _trial_runs(result.tracking_uri, "own-callables")
    assert {r.data.params["model.init_from_sha256"] for r in runs} == {file_sha256(checkpoint)}
    assert all("<locals>.grouped_net" in r.data.params["model.factory"] for r in runs)
    assert "init_from_sha256" in result.best.config["model"]
    # torch.export cannot trace it either, so the trials exported no model: nothing is registered (a pickled
    # model would be code a reader runs), and the pick and every trial's run say why.
    assert result.best.model_version is None and result.best.model_uri is None
    assert "champion not registered" in result.best.notes[0] and "pretrained.pt2" in result.best.notes[0]
    assert all("no pretrained.pt2" in r.data.tags[TAG_NOTES] and "GuardOnDataDependent" in r.data.tags[TAG_NOTES]
               for r in runs)
    # Untraceable: quantized by module order with BatchNorm unfolded, and every trial's run says so.
    assert all("not torch.fx-traceable" in r.data.tags[TAG_NOTES] for r in runs)
    # A re-run on a fresh seed is a Ray task of its own: the callables travel with it too.
    try:
        (confirmed,) = result.confirm(top=1, seeds=[1], out=tmp_path / "confirmed.yaml", progress=lambda line: None)
    finally:
        ray.shutdown()
    assert 1 in confirmed.values and 0 <= confirmed.values[1] <= 100


def test_the_runtime_env_ships_factories_from_the_working_directory_only(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    write_user_module(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.chdir(work)
    try:
        spec = load_sweep_spec(SPEC)
        assert runtime_env_for(spec) == {"py_modules": [str((work / "user_net.py").resolve())]}
        # Outside the working directory: not guessed (sweep.runtime_env says what to ship).
        assert runtime_env_for(spec, cwd=tmp_path / "elsewhere") == {}
        explicit = load_sweep_spec({**SPEC, "sweep": {**SPEC["sweep"], "runtime_env": {
            "py_modules": ["extra_pkg"], "env_vars": {"A": "1"}}}})
        assert runtime_env_for(explicit) == {"py_modules": ["extra_pkg", str((work / "user_net.py").resolve())],
                                             "env_vars": {"A": "1"}}
        # An installed package (torchvision) is never uploaded, even with a virtual environment in the working dir.
        installed = load_sweep_spec({**SPEC, "model": {"factory": "torchvision.models:mobilenet_v2"}})
        assert runtime_env_for(installed, cwd=Path(sys.prefix).parent) == {}
    finally:
        sys.modules.pop(MODULE, None)

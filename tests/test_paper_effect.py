"""benchmarks/paper_effect.py runs unchanged on CIFAR given a root: one command, real sweeps, resumable.

The run is the script itself in a subprocess (as a user runs it), on a CIFAR-10
folder the test writes, at the cifar10 scale preset with its epochs cut to one
(full-width ResNet-18 on 20 images): a tuned-baseline sweep, one R2 sweep, the
re-runs, the R2-off control, the best R2 on the baseline's knobs, the table and the
figures, every sweep in a real MLflow SQLite store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import write_cifar

from r2sweep.checkpoint import load_checkpoint
from r2sweep.sweep.spec import load_sweep_spec
from r2sweep.tracking import Tracker
from r2sweep.trial import config_fingerprint
from r2sweep.trial_config import load_trial_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_effect.py"
sys.path.insert(0, str(SCRIPT.parent))
import paper_effect  # noqa: E402


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_paper_effect_runs_on_a_cifar_root_and_resumes(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar", "cifar10", n_train=20, n_test=10)
    work, out = tmp_path / "work", tmp_path / "results" / "effect.json"
    args = ["--data", "cifar10", "--root", str(tmp_path / "cifar"), "--settings", "dkm-r18", "--kinds", "linf",
            "--trials", "1", "--seeds", "1", "--epochs", "1", "--finetune", "1", "--concurrency", "1",
            "--device", "cpu", "--work", str(work), "--out", str(out)]
    first = _run(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads(out.read_text())
    entry = results["settings"]["dkm-r18"]
    assert entry["base"]["data"] == {"name": "cifar10", "root": str(tmp_path / "cifar")}
    assert entry["base"]["model"] == {"name": "resnet18", "width": 1.0} and entry["base"]["train"]["epochs"] == 1
    assert set(entry["sweeps"]) == {"none", "linf"} and all(s["trials"] == 1 for s in entry["sweeps"].values())
    assert "r2.strength" in entry["sweeps"]["linf"]["config"] and "r2.strength" not in entry["sweeps"]["none"]["config"]
    for kind in ("none", "linf"):
        (rerun,) = entry["reruns"][kind]
        assert 0.0 <= rerun["dkm_w1/top1"] <= 100.0 and 0.0 <= rerun["fp/top1"] <= 100.0
        assert (work / "reruns" / f"dkm-r18-{kind}-seed1" / "pretrained.pt").is_file()
    # Every sweep is a real r2sweep sweep in the work folder's MLflow store.
    names = Tracker(f"sqlite:///{work / 'mlflow.db'}").experiment_names()
    assert {"dkm-r18-none", "dkm-r18-linf"} <= set(names)
    assert "| dkm-r18 | linf |" in first.stdout
    # The control: the best kind's configuration re-run with R2 switched off.
    control = entry["r2_off"]
    assert control["kind"] == "linf" and control["config"] == entry["sweeps"]["linf"]["config"]
    assert 0.0 <= control["runs"][0]["dkm_w1/top1"] <= 100.0
    (control_row,) = [line for line in first.stdout.splitlines() if "| dkm-r18 | none, linf's lr/wd (R2 off) |" in line]
    assert "linf over this: " in control_row  # what R2 itself buys: same seeds and knobs, R2 term only
    owner = load_checkpoint(work / "reruns" / "dkm-r18-linf-r2off-seed1" / "pretrain_state.pt")["owner"]
    spec = load_sweep_spec(paper_effect.sweep_spec("dkm-r18", "linf", entry["base"], paper_effect.SCALES["cifar10"],
                                                   argparse.Namespace(trials=1, concurrency=1, device="cpu")))
    mapping = {**spec.trial_mapping(control["config"]), "seed": 1}
    assert owner == config_fingerprint(load_trial_config({**mapping, "r2": {"kind": "none"}}))
    assert owner != config_fingerprint(load_trial_config(mapping))  # the same knobs, without the R2 term
    # Its other half: the tuned baseline's knobs with the best kind's R2 added.
    probe = entry["r2_on_base"]
    r2 = {"r2.strength": entry["sweeps"]["linf"]["config"]["r2.strength"]}
    assert probe["kind"] == "linf" and probe["config"] == {**entry["sweeps"]["none"]["config"], **r2}
    assert 0.0 <= probe["runs"][0]["dkm_w1/top1"] <= 100.0
    assert any(line.startswith("| dkm-r18 | linf on the baseline's knobs |") for line in first.stdout.splitlines())
    owner = load_checkpoint(work / "reruns" / "dkm-r18-linf-on-base-seed1" / "pretrain_state.pt")["owner"]
    assert owner == config_fingerprint(load_trial_config({**spec.trial_mapping(probe["config"]), "seed": 1}))
    # Where the outliers live, per model: one row each, the control's included.
    weights = [line for line in first.stdout.splitlines() if line.startswith("| dkm-r18 |") and "/" in line.split("|")[4]]
    assert [line.split("|")[2].strip() for line in weights] == ["none", "linf", "none, linf's lr/wd"], weights

    for figure in ("bits", "weights"):
        assert (out.parent / f"paper_effect_cifar10_dkm-r18_{figure}.png").read_bytes()[:4] == b"\x89PNG"

    # The same command again resumes: nothing is re-run, the results stay as they were.
    again = _run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith("| setting |"), again.stdout[:500]  # no "sweep ..." or "re-run ..." line first
    assert json.loads(out.read_text())["settings"] == results["settings"]

    # The work folder is scratch: with it gone the table still shows where the outliers lived.
    shutil.rmtree(work)
    table = _run(["--data", "cifar10", "--settings", "dkm-r18", "--out", str(out), "--work", str(work), "--table"])
    assert table.returncode == 0, table.stderr[-3000:]
    assert [line for line in table.stdout.splitlines() if line in weights] == weights

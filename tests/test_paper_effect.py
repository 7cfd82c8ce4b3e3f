"""benchmarks/paper_effect.py runs unchanged on CIFAR given a root: one command, real sweeps, resumable.

The run is the script itself in a subprocess (as a user runs it), on a CIFAR-10
folder the test writes, at the cifar10 scale preset with its epochs cut to one
and its ResNet-18 to width 0.25 (20 images; full width costs the suite minutes of DKM): a tuned-baseline sweep, one R2 sweep, the
re-runs, the R2-off control, the best R2 on the baseline's knobs, the table and the
figures, every sweep in a real MLflow SQLite store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_cifar

from r2sweep.core.checkpoint import load_checkpoint
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data import create_data, make_loader
from r2sweep.core.train import evaluate
from r2sweep.core.trial import config_fingerprint, load_pretrained
from r2sweep.tracking.store import Tracker

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_effect.py"
sys.path.insert(0, str(SCRIPT.parent))
import paper_effect  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def _recomputed(run: Path, mapping: dict) -> dict[str, float]:
    """A re-run's fp/top1 and dkm_w1/top1, evaluated again from the weights it saved.

    On the validation split of its trial config. The DKM result is saved with its
    clustered weights baked in and its inputs left in float, so it loads into the plain
    network once each wrapped layer's ``.layer.`` is dropped from its keys.
    """
    config = load_trial_config(mapping)
    data = create_data(config.data.name, seed=config.seed, root=config.data.root,
                       val_fraction=config.data.val_fraction, **config.data.options)
    val = make_loader(data.val, 256, shuffle=False, seed=config.seed)
    model, _ = load_pretrained(run / "pretrained.pt")
    fp = evaluate(model, val, torch.device("cpu"))
    clustered = load_checkpoint(run / "dkm_w1.pt")["model"]
    model.load_state_dict({name.replace(".layer.", "."): value for name, value in clustered.items()})
    return {"fp/top1": fp, "dkm_w1/top1": evaluate(model, val, torch.device("cpu"))}


def _mean_sd_text(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def _rows(stdout: str, label: str) -> list[list[str]]:
    """The cells of the results table's rows for ``label`` (the weights table's rows have no "+-")."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in stdout.splitlines()
            if line.startswith(f"| dkm-r18 | {label} |")]
    return [cells for cells in rows if "+-" in cells[2]]


def test_paper_effect_runs_on_a_cifar_root_and_resumes(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar", "cifar10", n_train=20, n_test=10)
    work, out = tmp_path / "work", tmp_path / "results" / "effect.json"
    args = ["--data", "cifar10", "--root", str(tmp_path / "cifar"), "--settings", "dkm-r18", "--kinds", "linf",
            "--trials", "1", "--seeds", "1", "--epochs", "1", "--finetune", "1", "--width", "0.25", "--concurrency", "1",
            "--device", "cpu", "--work", str(work), "--out", str(out)]
    first = _run(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads(out.read_text())
    entry = results["settings"]["dkm-r18"]
    assert entry["base"]["data"] == {"name": "cifar10", "root": str(tmp_path / "cifar")}
    assert entry["base"]["model"] == {"name": "resnet18", "width": 0.25} and entry["base"]["train"]["epochs"] == 1
    assert set(entry["sweeps"]) == {"none", "linf"} and all(s["trials"] == 1 for s in entry["sweeps"].values())
    assert "r2.strength" in entry["sweeps"]["linf"]["config"] and "r2.strength" not in entry["sweeps"]["none"]["config"]
    specs = {kind: load_sweep_spec(paper_effect.sweep_spec("dkm-r18", kind, entry["base"], paper_effect.SCALES["cifar10"],
                                                           argparse.Namespace(trials=1, concurrency=1, device="cpu")))
             for kind in ("none", "linf")}
    objective = {}  # per row of the table: the objective of each seed, as the JSON holds it
    for kind in ("none", "linf"):
        (rerun,) = entry["reruns"][kind]
        # The numbers recorded are the accuracies of the weights the re-run saved.
        mapping = {**specs[kind].trial_mapping(entry["sweeps"][kind]["config"]), "seed": 1}
        recomputed = _recomputed(work / "reruns" / f"dkm-r18-{kind}-seed1", mapping)
        assert {k: rerun[k] for k in recomputed} == recomputed
        objective[kind] = [r["dkm_w1/top1"] for r in entry["reruns"][kind]]
        # The table prints the mean +- sd over the seeds of those numbers, objective then FP.
        (cells,) = _rows(first.stdout, kind)
        assert cells[2] == _mean_sd_text(objective[kind])
        assert cells[3] == _mean_sd_text([r["fp/top1"] for r in entry["reruns"][kind]])
    (cells,) = _rows(first.stdout, "linf")  # its gain: the difference of the two means
    assert cells[4].split()[0] == f"{statistics.fmean(objective['linf']) - statistics.fmean(objective['none']):+.1f}"
    # Every sweep is a real r2sweep sweep in the work folder's MLflow store.
    names = Tracker(f"sqlite:///{work / 'mlflow.db'}").experiment_names()
    assert {"dkm-r18-none", "dkm-r18-linf"} <= set(names)
    assert "| dkm-r18 | linf |" in first.stdout
    # The control: the best kind's configuration re-run with R2 switched off.
    control = entry["r2_off"]
    assert control["kind"] == "linf" and control["config"] == entry["sweeps"]["linf"]["config"]
    spec = specs["linf"]
    mapping = {**spec.trial_mapping(control["config"]), "seed": 1}
    recomputed = _recomputed(work / "reruns" / "dkm-r18-linf-r2off-seed1", {**mapping, "r2": {"kind": "none"}})
    assert {k: control["runs"][0][k] for k in recomputed} == recomputed
    control_values = [r["dkm_w1/top1"] for r in control["runs"]]
    (cells,) = _rows(first.stdout, "none, linf's lr/wd (R2 off)")
    assert cells[2] == _mean_sd_text(control_values)
    # What R2 itself buys: linf's mean over this row's, same seeds and knobs, R2 term only.
    own_gain = statistics.fmean(objective["linf"]) - statistics.fmean(control_values)
    assert cells[6].startswith(f"linf over this: {own_gain:+.1f} +- ")
    owner = load_checkpoint(work / "reruns" / "dkm-r18-linf-r2off-seed1" / "pretrain_state.pt")["owner"]
    assert owner == config_fingerprint(load_trial_config({**mapping, "r2": {"kind": "none"}}))
    assert owner != config_fingerprint(load_trial_config(mapping))  # the same knobs, without the R2 term
    # Its other half: the tuned baseline's knobs with the best kind's R2 added.
    probe = entry["r2_on_base"]
    r2 = {"r2.strength": entry["sweeps"]["linf"]["config"]["r2.strength"]}
    assert probe["kind"] == "linf" and probe["config"] == {**entry["sweeps"]["none"]["config"], **r2}
    recomputed = _recomputed(work / "reruns" / "dkm-r18-linf-on-base-seed1",
                             {**spec.trial_mapping(probe["config"]), "seed": 1})
    assert {k: probe["runs"][0][k] for k in recomputed} == recomputed
    (cells,) = _rows(first.stdout, "linf on the baseline's knobs")
    assert cells[2] == _mean_sd_text([r["dkm_w1/top1"] for r in probe["runs"]])
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
    results_rows = [line for line in first.stdout.splitlines() if line.startswith("| dkm-r18 |") and line not in weights]
    assert len(results_rows) == 4 and [line for line in table.stdout.splitlines() if line in results_rows] == results_rows

"""The trial: its YAML schema (strict), overrides, run_trial's reports, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_main

from r2sweep.core.checkpoint import load_checkpoint
from r2sweep.core.config.overrides import apply_overrides, parse_override
from r2sweep.core.config.trial import load_trial_config, read_yaml
from r2sweep.core.environment import resolve_inputs
from r2sweep.core.errors import ConfigError
from r2sweep.core.quant.methods import DKMConfig, load_downstream
from r2sweep.core.trial import run_trial

REPO = Path(__file__).resolve().parents[1]

# --- schema -------------------------------------------------------------------------


def test_defaults_and_metric_names() -> None:
    config = load_trial_config(
        {
            "downstream": [
                {"method": "ptq", "algorithm": "adaround", "weight_bits": [2, 4]},
                {"method": "ptq", "algorithm": "rtn", "weight_bits": 2, "act_bits": 32},
                {"method": "qat", "algorithm": "ewgs", "weight_bits": [2], "act_bits": 2},
                {"method": "dkm", "weight_bits": [1]},
            ]
        }
    )
    assert config.seed == 0 and config.data.name == "digits" and config.model.name == "small_cnn"
    assert config.metric_names() == [
        "fp/top1",
        "ptq_adaround_w2a8/top1",
        "ptq_adaround_w4a8/top1",
        "ptq_rtn_w2a32/top1",
        "qat_ewgs_w2a2/top1",
        "dkm_w1/top1",
    ]
    assert config.downstream[2].algorithm == "ewgs" and config.downstream[3].act_bits == 32


def test_tags_tell_two_entries_of_one_algorithm_apart() -> None:
    config = load_trial_config(
        {"downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": 2},
                        {"method": "ptq", "algorithm": "rtn", "weight_bits": 2, "range": "minmax", "tag": "naive"}]}
    )
    assert config.metric_names()[1:] == ["ptq_rtn_w2a8/top1", "ptq_rtn_w2a8_naive/top1"]
    assert config.downstream[0].bn_fold is True  # folded unless BN is re-estimated
    assert load_downstream({"method": "ptq", "bn_reestimate": True})[0].bn_fold is False


def test_round_trip_through_yaml() -> None:
    config = load_trial_config(
        {"seed": 3, "data": {"name": "synthetic", "num_samples": 64}, "r2": {"kind": "margin", "strength": 0.1},
         "downstream": [{"method": "dkm", "weight_bits": 1, "tau": 0.1}]}
    )
    again = load_trial_config(yaml.safe_load(yaml.safe_dump(config.to_mapping())))
    assert again == config
    # Defaults are filled in: {num_samples: 64} and the same with noise: 0.5 written out are one experiment.
    assert again.data.options == {"num_samples": 64, "channels": 1, "input_size": 8, "noise": 0.5, "num_classes": 10}


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"trian": {}}, "trian", "did you mean 'train'"),
        ({"train": {"epochs": "ten"}}, "train.epochs", "an integer"),
        ({"train": {"epochs": 0}}, "train.epochs", ">= 1"),
        ({"train": {"lr": -1}}, "train.lr", "> 0"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"seed": "x"}, "seed", "integer"),
        ({"model": {"name": "resnet"}}, "model.name", "mobilenet_v2"),
        ({"model": {"widht": 1}}, "model.widht", "did you mean 'width'"),
        ({"data": {"name": "mnist"}}, "data.name", "digits"),
        ({"data": {"name": "digits", "num_samples": 3}}, "data.num_samples", "unknown field"),
        ({"r2": {"kind": "l2"}}, "r2.kind", "linf"),
        ({"r2": {"kind": "linf", "strength": -1}}, "r2.strength", ""),
        ({"downstream": [{"method": "gptq"}]}, "downstream[0].method", "['ptq', 'qat', 'dkm']"),
        ({"downstream": [{"method": "qat", "algorithm": "adaround"}]}, "downstream[0].algorithm", "['lsq', 'lsqplus', 'ewgs']"),
        ({"downstream": [{"method": "ptq", "weight_bits": [9]}]}, "downstream[0].weight_bits", "1 to 8"),
        ({"downstream": [{"method": "ptq", "weight_bits": []}]}, "downstream[0].weight_bits", "non-empty"),
        ({"downstream": [{"method": "ptq", "act_bits": 16}]}, "downstream[0].act_bits", "1 to 8"),
        ({"downstream": [{"method": "dkm", "act_bits": 8}]}, "downstream[0].act_bits", "weights only"),
        ({"downstream": [{"method": "ptq", "tau": 0.1}]}, "downstream[0].tau", "only by ['dkm']"),
        ({"downstream": [{"method": "dkm", "range": "mse"}]}, "downstream[0].range", "only by ['ptq']"),
        ({"downstream": [{"method": "ptq", "granularity": "layer"}]}, "downstream[0].granularity", "tensor"),
        ({"downstream": [{"method": "ptq"}, {"method": "qat", "epochs": -1}]}, "downstream[1].epochs", ">= 0"),
        ({"downstream": [{"method": "ptq", "weight_bits": 2}, {"method": "ptq", "weight_bits": [2]}]}, "downstream[1]", "ptq_adaround_w2a8"),
        ({"downstream": [{"method": "ptq", "frobnicate": 1}]}, "downstream[0].frobnicate", "unknown field"),
        ({"downstream": ["ptq"]}, "downstream[0]", "a mapping"),
        ({"downstream": [{"method": "ptq", "tag": "Has Space"}]}, "downstream[0].tag", "lower-case"),
        ({"downstream": [{"method": "ptq", "bn_fold": True, "bn_reestimate": True}]}, "downstream[0].bn_fold", "bn_reestimate"),
    ],
)
def test_bad_fields_are_named(data: dict, field: str, fragment: str) -> None:
    # A model or dataset name is looked up where the trial runs (a plugin's may be missing where it is
    # only read); every other field is refused by the load itself.
    with pytest.raises(ConfigError) as caught:
        config = load_trial_config(data)
        if field in ("model.name", "data.name"):
            resolve_inputs(config)
    assert caught.value.field == field
    assert fragment in str(caught.value)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="config="):
        load_trial_config([1, 2])


def test_read_yaml_reports_syntax_errors_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="line 3"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="an existing YAML file"):
        read_yaml(tmp_path / "missing.yaml")


def test_overrides_write_dotted_paths_and_are_validated() -> None:
    raw = {"downstream": [{"method": "ptq", "weight_bits": [2]}]}
    merged = apply_overrides(
        raw, [parse_override("downstream.0.weight_bits=[2, 4]"), parse_override("r2.kind=linf"), parse_override("r2.strength=0.1")]
    )
    config = load_trial_config(merged)
    assert config.downstream[0].weight_bits == [2, 4] and config.r2.kind == "linf" and config.r2.strength == 0.1
    assert raw["downstream"][0]["weight_bits"] == [2]  # the input is not modified
    with pytest.raises(ConfigError, match="downstream.3"):
        apply_overrides(raw, [parse_override("downstream.3.epochs=1")])
    with pytest.raises(ConfigError, match="PATH=VALUE"):
        parse_override("train.lr")
    with pytest.raises(ConfigError) as caught:
        load_trial_config(apply_overrides(raw, [parse_override("train.epochs=ten")]))
    assert caught.value.field == "train.epochs"


def test_downstream_single_mapping_is_a_one_entry_list() -> None:
    assert load_downstream({"method": "dkm", "weight_bits": 1}) == [DKMConfig(weight_bits=[1])]


# --- run_trial ----------------------------------------------------------------------


def test_run_trial_reports_each_epoch_with_the_proxy_then_everything(tmp_path: Path) -> None:
    config = load_trial_config(
        {
            "data": {"name": "synthetic", "num_samples": 256},
            "model": {"name": "small_cnn", "width": 0.25},
            "train": {"epochs": 2, "batch_size": 32},
            "r2": {"kind": "linf", "strength": 0.01},
            "downstream": [
                {"method": "ptq", "algorithm": "rtn", "weight_bits": [4, 2]},
                {"method": "qat", "algorithm": "lsq", "weight_bits": 2, "act_bits": 4, "epochs": 1},
                {"method": "dkm", "weight_bits": 1, "epochs": 1},
            ],
        }
    )
    reports: list[dict] = []
    lines: list[str] = []
    final = run_trial(config, reports.append, out_dir=tmp_path, progress=lines.append, device=torch.device("cpu"))
    epochs, last = reports[:-1], reports[-1]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(0 <= r["proxy/top1"] <= 100 and "val/top1" in r and "train/r2" in r for r in epochs)
    assert last == final and last["final"] == 1 and "final" not in epochs[0]
    for name in config.metric_names():
        assert 0 <= final[name] <= 100
    assert {"proxy/top1", "weights/max_abs", "weights/kurtosis", "time/pretrain_s", "time/ptq_rtn_w2a8_s", "time/dkm_w1_s"} <= set(final)
    written = {p.name for p in tmp_path.iterdir()}
    assert {"pretrained.pt", "pretrain_state.pt", "ptq_rtn_w4a8.pt", "ptq_rtn_w2a8.pt", "qat_lsq_w2a4.pt", "dkm_w1.pt"} <= written
    # The DKM checkpoint holds the clustered weights: at most 2 values per middle layer.
    state = load_checkpoint(tmp_path / "dkm_w1.pt")["model"]
    weights = [v for k, v in state.items() if k.endswith("layer.weight")]
    assert all(torch.unique(w).numel() <= 2 for w in weights[1:-1])
    assert any("fine-tune epoch 1/1" in line for line in lines)


def test_run_trial_is_reproducible_for_a_seed() -> None:
    config = load_trial_config(
        {"data": {"name": "synthetic", "num_samples": 128}, "model": {"width": 0.25}, "train": {"epochs": 1, "batch_size": 32},
         "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": 2}]}
    )
    cpu = torch.device("cpu")
    assert run_trial(config, device=cpu)["ptq_rtn_w2a8/top1"] == run_trial(config, device=cpu)["ptq_rtn_w2a8/top1"]


# --- the CLI on digits --------------------------------------------------------------

DIGITS_TRIAL = (REPO / "search_spaces" / "trial_digits.yaml").read_text()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real ``python -m r2sweep.cli`` in its own process (what a user's shell sees, import-time output
    included): once per test; the rest go through ``cli_main`` in this process."""
    return subprocess.run([sys.executable, "-m", "r2sweep.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_trial_on_digits_writes_every_result(tmp_path: Path) -> None:
    (tmp_path / "trial.yaml").write_text(DIGITS_TRIAL)
    done = _cli("trial", "trial.yaml", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ["fp/top1", "ptq_adaround_w2a8/top1", "ptq_adaround_w8a8/top1", "qat_lsq_w2a2/top1", "dkm_w1/top1"]:
        assert 0 <= metrics[key] <= 100, key
    assert metrics["fp/top1"] > 90
    assert abs(metrics["ptq_adaround_w8a8/top1"] - metrics["fp/top1"]) <= 1.0
    # 2-bit results far above chance (10%): the methods work, not just run.
    assert min(metrics["ptq_adaround_w2a8/top1"], metrics["qat_lsq_w2a2/top1"], metrics["dkm_w1/top1"]) > 50
    resolved = load_trial_config(yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()))
    assert resolved.downstream[0].adaround_iters == 500 and resolved.train.epochs == 2
    assert "pre-train epoch 2/2" in done.stderr and "dkm_w1: top-1" in done.stderr
    assert "fp/top1" in done.stdout


def test_cli_bad_file_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "trial.yaml").write_text(DIGITS_TRIAL)
    done = _cli("trial", "trial.yaml", "--out", "out", "--set", "train.epochs=ten", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "train.epochs='ten'" in done.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.yaml").write_text("downstream:\n  - {method: ptq, weight_bits: [2], tua: 1}\n")
    done = cli_main("trial", "bad.yaml", "--out", "out", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.returncode == 2 and "downstream[0].tua" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_folder_resumes_its_own_config_and_refuses_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mapping = {"data": {"name": "synthetic", "num_samples": 128}, "model": {"width": 0.25},
               "train": {"epochs": 2, "batch_size": 32}, "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": 4}]}
    config = load_trial_config(mapping)
    cpu = torch.device("cpu")
    first = run_trial(config, out_dir=tmp_path, device=cpu)
    # The same config again: pre-training resumes after the last saved epoch (no epoch re-run).
    epochs: list[dict] = []
    again = run_trial(config, epochs.append, out_dir=tmp_path, device=cpu)
    assert [r for r in epochs if "epoch" in r and "final" not in r] == []
    assert again["ptq_rtn_w4a8/top1"] == first["ptq_rtn_w4a8/top1"]
    # Another config into the same folder: refused with a message that names the fix.
    other = load_trial_config({**mapping, "train": {**mapping["train"], "lr": 0.2}})
    with pytest.raises(ConfigError, match="different trial config.*--out"):
        run_trial(other, out_dir=tmp_path, device=cpu)
    # The CLI says so in one line, exit 2.
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(mapping))
    cli = {"cwd": tmp_path, "monkeypatch": monkeypatch, "capsys": capsys}
    assert cli_main("trial", "trial.yaml", "--out", "run", **cli).returncode == 0
    kept = (tmp_path / "run" / "config.yaml").read_text()
    done = cli_main("trial", "trial.yaml", "--out", "run", "--set", "train.lr=0.2", **cli)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "different trial config" in done.stderr
    assert (tmp_path / "run" / "config.yaml").read_text() == kept  # refused before anything was written

"""The user's own model, dataset and checkpoint, without Ray: the contract, the checks, plugins, init_from.

The model and the dataset live in a temporary module the test writes
(tests/user_code.py holds its text): a residual block with a grouped and a
depthwise conv, SiLU, an ``amax`` pooling head, its classifier registered before
its stem; the data are NumPy arrays.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

import r2sweep
from r2sweep.core.build import build_trial_data, build_trial_model, check_inputs, model_from_pretrained
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data import DATASETS
from r2sweep.core.environment import resolve_inputs
from r2sweep.core.errors import ConfigError
from r2sweep.core.models import MODELS, create_model
from r2sweep.core.pretrained_file import load_pretrained
from r2sweep.core.trial import config_fingerprint
from r2sweep.core.warm_start import load_weights
from user_code import MODULE, write_user_module

FAST_DOWNSTREAM = [
    {"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "adaround_iters": 5, "calib_samples": 32},
    {"method": "qat", "algorithm": "lsq", "weight_bits": [2], "epochs": 1, "batch_size": 32},
    {"method": "dkm", "weight_bits": [1], "epochs": 1, "batch_size": 32},
]
USER_TRIAL = {
    "data": {"factory": f"{MODULE}:load", "samples": 400},
    "model": {"factory": f"{MODULE}:build", "channels": 16},
    "train": {"epochs": 4, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
    "r2": {"kind": "margin", "strength": 0.01},
    "downstream": FAST_DOWNSTREAM,
}


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "user"
    write_user_module(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop(MODULE, None)


def test_a_factory_section_loads_with_its_options_checked_against_its_signature(user_module: Path) -> None:
    loaded = load_trial_config(USER_TRIAL)  # pure: the text checked, the module not imported
    assert MODULE not in sys.modules and loaded.model.options == {"channels": 16}
    config = resolve_inputs(loaded)
    assert config.model.to_mapping() == {"factory": "user_net:build", "channels": 16, "record_to": None}
    assert config.data.to_mapping() == {"factory": "user_net:load", "samples": 400, "val_share": 0.25}  # defaults filled in
    assert load_trial_config(config.to_mapping()) == config  # the mapping reads back as the same config
    with pytest.raises(ConfigError, match=r"model\.chanels=16 .*did you mean 'channels'") as info:
        resolve_inputs(load_trial_config({**USER_TRIAL, "model": {"factory": "user_net:build", "chanels": 16}}))
    assert info.value.field == "model.chanels"
    with pytest.raises(ConfigError, match=r"data\.root='/x' .*user_net:load takes no root"):
        resolve_inputs(load_trial_config({**USER_TRIAL, "data": {"factory": "user_net:load", "root": "/x"}}))


@pytest.mark.parametrize(("model", "field", "message"), [
    ({"factory": "no_such_module:build"}, "model.factory", "ModuleNotFoundError: No module named 'no_such_module'"),
    ({"factory": "user_net:nothing"}, "model.factory", "it has no 'nothing'"),
    ({"factory": "user_net:Path"}, "model.factory", None),  # a class is callable: accepted here, checked when built
    ({"factory": "user_net"}, "model.factory", "an import reference 'module:function'"),
    ({"factory": "user_net:build", "name": "resnet18"}, "model.factory", "not both"),
    ({"factory": "user_net:fixed_head", "in_channels": 3}, "model.in_channels", "unknown field"),
])
def test_a_bad_factory_reference_is_one_error_naming_the_field(user_module: Path, model, field, message) -> None:
    if message is None:
        resolve_inputs(load_trial_config({**USER_TRIAL, "model": model}))
        return
    with pytest.raises(ConfigError) as info:
        resolve_inputs(load_trial_config({**USER_TRIAL, "model": model}))
    assert info.value.field == field and message in str(info.value)


@pytest.mark.parametrize(("section", "factory", "message"), [
    ("model", "not_a_model", "a factory that returns a torch.nn.Module; it returned a str"),
    ("model", "fixed_head", "returns (batch, num_classes) = (4, 10) logits for a batch of shape (4, 1, 8, 8); it returned (4, 3)"),
    ("model", "broken_forward", "a batch of shape (4, 1, 8, 8) raised RuntimeError"),
    ("data", "not_splits", "(train, val) or {'train': ..., 'val': ...}"),
])
def test_the_driver_check_builds_and_runs_one_batch(user_module: Path, section: str, factory: str, message: str) -> None:
    config = load_trial_config({**USER_TRIAL, section: {"factory": f"{MODULE}:{factory}"}})
    with pytest.raises(ConfigError) as info:
        check_inputs(config)
    assert info.value.field == f"{section}.factory" and message in str(info.value)
    assert check_inputs(load_trial_config(USER_TRIAL)) == []  # the good one: traceable, no notes


def test_the_trial_command_refuses_a_bad_factory_with_exit_2_and_one_line(user_module: Path, tmp_path: Path) -> None:
    trial = tmp_path / "trial.yaml"
    trial.write_text(yaml.safe_dump({**USER_TRIAL, "model": {"factory": f"{MODULE}:fixed_head"}}))
    done = subprocess.run([str(Path(sys.executable).with_name("r2sweep")), "trial", str(trial), "--out", "out"],
                          cwd=user_module, capture_output=True, text=True, timeout=300)  # cwd: the module imports from there
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "model.factory='user_net:fixed_head'" in done.stderr
    assert not (user_module / "out").exists()


def test_a_trial_of_the_user_model_and_data_runs_every_downstream_method(user_module: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    metrics = r2sweep.run_trial(USER_TRIAL, out_dir=tmp_path / "run", progress=lines.append)
    assert metrics["fp/top1"] > 50  # 10 classes: far above chance after 4 epochs
    for name in ("ptq_adaround_w2a8", "qat_lsq_w2a8", "dkm_w1"):
        assert 0 <= metrics[f"{name}/top1"] <= 100
    assert "notes" not in metrics
    saved = load_pretrained(tmp_path / "run" / "pretrained.pt")  # tensors and plain data: no code named
    assert saved.input_shape == [1, 8, 8] and saved.num_classes == 10 and saved.layers
    model = model_from_pretrained(load_trial_config(USER_TRIAL), tmp_path / "run" / "pretrained.pt")  # our own config
    assert type(model).__name__ == "UserNet"
    assert (tmp_path / "run" / "pretrained.pt2").is_file()  # the exported model, what a champion registers


def test_callables_from_python_are_the_same_contract(user_module: Path) -> None:
    import user_net

    config = load_trial_config({**USER_TRIAL, "model": {"factory": user_net.build}, "data": {"factory": user_net.load}})
    assert config.model.factory == "user_net:build"  # importable by name: stored as its reference

    def local_model(*, num_classes, in_channels, input_size):  # not importable: kept as a local callable
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * input_size**2, num_classes))

    config = load_trial_config({**USER_TRIAL, "model": {"factory": local_model}})
    assert config.model.factory.endswith("local_model") and "<locals>" in config.model.factory
    assert check_inputs(config) == []


def _install_plugin(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real installed distribution, as pip leaves it: a module and its .dist-info with entry points."""
    write_user_module(site)
    info = site / "user_nets-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: user-nets\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[r2sweep.models]\nuser_net = user_net:build\n\n[r2sweep.datasets]\nuser_digits = user_net:load\n"
        "broken_data = no_such_module:load\n")
    monkeypatch.syspath_prepend(str(site))
    for registry in (MODELS, DATASETS):
        registry.load_plugins(again=True)


def test_an_installed_plugin_joins_the_registries_and_the_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _install_plugin(tmp_path / "site", monkeypatch)
    try:
        config = load_trial_config({**USER_TRIAL, "model": {"name": "user_net", "channels": 4},
                                    "data": {"name": "user_digits", "samples": 120}})
        assert check_inputs(config) == []
        from r2sweep.cli.app import main

        assert main(["list"]) == 0
        out = capsys.readouterr().out
        assert "user_net: plugin user-nets (user_net:build)" in out and "user_digits: plugin user-nets" in out
        assert "broken_data (not usable): plugin user-nets (no_such_module:load) failed to import" in out
        with pytest.raises(ConfigError, match="No module named 'no_such_module'"):
            resolve_inputs(load_trial_config({**USER_TRIAL, "data": {"name": "broken_data"}}))
    finally:
        for registry, name in ((MODELS, "user_net"), (DATASETS, "user_digits")):
            registry.unregister(name)
        sys.modules.pop(MODULE, None)


def _digits_trial(**sections) -> dict:
    base = {"data": {"name": "digits"}, "model": {"name": "small_cnn", "width": 0.5},
            "train": {"epochs": 4, "batch_size": 64, "lr": 0.05}, "r2": {"kind": "none"}}
    return {**base, **sections}


def test_fine_tuning_from_a_trial_checkpoint_keeps_its_accuracy(tmp_path: Path) -> None:
    source = r2sweep.run_trial(_digits_trial(), out_dir=tmp_path / "source")
    checkpoint = tmp_path / "source" / "pretrained.pt"
    tuned = r2sweep.run_trial(_digits_trial(
        model={"name": "small_cnn", "width": 0.5, "init_from": str(checkpoint)},
        train={"epochs": 2, "batch_size": 64, "lr": 0.005},
        r2={"kind": "margin", "strength": 0.01}))
    assert tuned["fp/top1"] >= source["fp/top1"] - 1.0, (source["fp/top1"], tuned["fp/top1"])
    # Margin's learnable margins start from the loaded weights' ranges, not the random init's.
    config = load_trial_config(_digits_trial(model={"name": "small_cnn", "width": 0.5, "init_from": str(checkpoint)},
                                             r2={"kind": "margin", "strength": 0.01}))
    model, notes = build_trial_model(config, build_trial_data(config))
    r2 = config.r2.build(model)
    r2()
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert notes == [] and torch.allclose(r2.margins[0], saved["features.0.0.weight"].abs().max())


def test_a_checkpoint_is_strict_names_its_mismatches_and_is_part_of_the_config(tmp_path: Path) -> None:
    wrong = tmp_path / "resnet.pt"
    torch.save(create_model("resnet18", num_classes=10, in_channels=1, input_size=8).state_dict(), wrong)
    config = load_trial_config(_digits_trial(model={"name": "small_cnn", "init_from": str(wrong)}))
    with pytest.raises(ConfigError, match=r"model\.init_from=.*resnet\.pt has 18 missing \(features\.0\.0\.weight.*120 unexpected \(conv1\.weight"):
        check_inputs(config)
    # Another head: refused when strict, loaded with a note when not.
    head5 = tmp_path / "five_classes.pt"
    torch.save(create_model("small_cnn", num_classes=5, in_channels=1, input_size=8).state_dict(), head5)
    strict = load_trial_config(_digits_trial(model={"name": "small_cnn", "init_from": str(head5)}))
    with pytest.raises(ConfigError, match=r"2 wrong shape \(fc\.weight: checkpoint \(5, 128\), model \(10, 128\), "
                                          r"fc\.bias.*init_from_strict: false"):
        check_inputs(strict)
    loose = load_trial_config(_digits_trial(model={"name": "small_cnn", "init_from": str(head5), "init_from_strict": False}))
    (note,) = check_inputs(loose)
    assert note.startswith("init_from: ") and "left as initialised: 2 wrong shape (fc.weight" in note
    # The content hash is in the config: two checkpoints are two experiments, and a changed file is refused.
    assert strict.model.init_from_sha256 and strict.model.init_from_sha256 != config.model.init_from_sha256
    assert config_fingerprint(strict) != config_fingerprint(config)
    pinned = strict.to_mapping()
    torch.save(create_model("small_cnn", num_classes=5, in_channels=1, input_size=8).state_dict(), head5)  # new bytes
    with pytest.raises(ConfigError, match="it changed"):
        resolve_inputs(load_trial_config(pinned))
    # Not a checkpoint at all.
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match=r"model\.init_from=.*a checkpoint torch\.load reads"):
        check_inputs(load_trial_config(_digits_trial(model={"name": "small_cnn", "init_from": str(text)})))
    with pytest.raises(ConfigError, match="an existing checkpoint file"):
        resolve_inputs(load_trial_config(_digits_trial(model={"name": "small_cnn", "init_from": str(tmp_path / "absent.pt")})))


def test_a_torchvision_checkpoint_loads_strictly_into_the_same_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    model = create_model("resnet18", num_classes=10, in_channels=3, input_size=32, stem="imagenet")
    report = load_weights(model, path)
    assert report.complete and report.loaded == len(model.state_dict())
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    pickled = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(num_classes=10), pickled)  # a pickled module, not weights
    with pytest.raises(ConfigError, match="saved weights, not a pickled model"):
        load_weights(model, pickled)


def _documented_example() -> tuple[str, str]:
    text = (Path(__file__).parent.parent / "docs" / "own_model.md").read_text()
    block = re.search(r"<!-- own-model:start -->\s*```python\n(.*?)```\s*```yaml\n(.*?)```\s*<!-- own-model:end -->", text, re.S)
    assert block, "docs/own_model.md lost its own-model example (<!-- own-model:start --> python, yaml <!-- own-model:end -->)"
    return block.group(1), block.group(2)


def test_the_documented_example_loads_checks_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, sweep_file = _documented_example()
    (tmp_path / "my_nets.py").write_text(module)
    (tmp_path / "own.yaml").write_text(sweep_file)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        spec = r2sweep.load_sweep_spec("own.yaml")
        assert spec.trial.model.factory == "my_nets:build" and check_inputs(spec.trial) == []
        metrics = r2sweep.run_trial(spec.trial, overrides={"train.epochs": 3, "r2.strength": 0.01})
        assert metrics["fp/top1"] > 70 and "ptq_rtn_w2a8/top1" in metrics
    finally:
        sys.modules.pop("my_nets", None)


def test_an_untraceable_model_is_quantized_by_module_order_with_a_note_in_the_log(user_module: Path) -> None:
    class Branching(torch.nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.conv = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, num_classes)

        def forward(self, x):
            x = self.bn(self.conv(x))
            if x.mean() > 1e6:  # data decides: torch.fx cannot trace it
                x = -x
            return self.fc(x.mean((2, 3)))

    def branching(*, num_classes, in_channels):
        return Branching(num_classes, in_channels)

    lines: list[str] = []
    metrics = r2sweep.run_trial({**USER_TRIAL, "model": {"factory": branching}, "train": {"epochs": 1},
                                 "downstream": FAST_DOWNSTREAM[:1]}, progress=lines.append)
    (note,) = [line for line in lines if line.startswith("note: ")]
    assert "model is not torch.fx-traceable" in note and "BatchNorm left unfolded" in note
    assert metrics["notes"] == note.removeprefix("note: ") and 0 <= metrics["ptq_adaround_w2a8/top1"] <= 100

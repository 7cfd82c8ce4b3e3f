"""Data-parallel pre-training without Ray: ranks as local processes (``r2sweep trial`` runs them so).

Real gloo process groups over the loopback, real DDP, real training on digits.
The cluster side (Tune reserving the ranks, a node lost) is tests/test_data_parallel_cluster.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_main, tiny_sweep

from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data import create_data, make_loader
from r2sweep.core.errors import ConfigError, TrialDiverged
from r2sweep.core.pretrain_cache import pretrain_key
from r2sweep.core.pretrained_file import PRETRAINED
from r2sweep.core.trial import run_trial

CPU = torch.device("cpu")
TRIAL = {"seed": 2, "data": {"name": "digits"}, "model": {"name": "small_cnn", "width": 0.5},
         "train": {"epochs": 3, "batch_size": 64, "lr": 0.1, "workers": 2},
         "r2": {"kind": "margin", "strength": 0.01},
         "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}]}


class Preempted(Exception):
    """Stands for a trial killed between epochs."""


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / PRETRAINED, weights_only=True)["model"]


def test_a_two_rank_trial_resumes_exactly_and_reports_its_all_reduce(tmp_path: Path) -> None:
    config = load_trial_config(TRIAL)
    whole = run_trial(config, out_dir=tmp_path / "whole", device=CPU)
    params = _parameters(config)
    assert whole["comm/bytes_per_step"] == 4 * params and whole["comm/allreduce_calls_per_step"] == 1

    def stop_after_epoch_1(metrics: dict) -> None:
        if metrics.get("epoch") == 1:
            raise Preempted

    with pytest.raises(Preempted):
        run_trial(config, stop_after_epoch_1, out_dir=tmp_path / "cut", device=CPU)
    epochs: list[dict] = []
    resumed = run_trial(config, epochs.append, out_dir=tmp_path / "cut", device=CPU)
    assert [m["epoch"] for m in epochs if "final" not in m] == [2]
    assert resumed["pretrain/resumed_epochs"] == 2
    # Rank 0 wrote the checkpoint alone and sent its state to rank 1 on resume; each rank's
    # dropout stream is reseeded per epoch: the resumed trial ends bit-identical.
    for (name, a), b in zip(_weights(tmp_path / "whole").items(), _weights(tmp_path / "cut").values()):
        assert torch.equal(a, b), name
    assert resumed["ptq_rtn_w4a8/top1"] == whole["ptq_rtn_w4a8/top1"]


def _parameters(config) -> int:
    from r2sweep.core.build import build_trial_data, build_trial_model

    model, _ = build_trial_model(config, build_trial_data(config))
    return sum(p.numel() for p in model.parameters())


def test_a_rank_count_is_part_of_the_cache_key_and_one_rank_keeps_the_old_key() -> None:
    two = load_trial_config(TRIAL)
    one = load_trial_config({**TRIAL, "train": {**TRIAL["train"], "workers": 1}})
    assert pretrain_key(two, CPU).digest != pretrain_key(one, CPU).digest
    assert pretrain_key(two, CPU).material["train"]["workers"] == 2
    assert "workers" not in pretrain_key(one, CPU).material["train"]  # keys stored before workers existed still hit


def test_a_diverging_data_parallel_trial_fails_on_every_rank_at_once() -> None:
    config = load_trial_config({**TRIAL, "train": {**TRIAL["train"], "lr": 1e9, "epochs": 2}})
    with pytest.raises(TrialDiverged, match="some rank"):
        run_trial(config, device=CPU)  # returns: the other rank ended too, nobody waits in an all-reduce


def test_ranks_take_equal_disjoint_shares_of_each_batch() -> None:
    data = create_data("digits", seed=0).train  # 1,437 samples: batches of 64 leave 29
    whole = list(make_loader(data, 64, shuffle=True, seed=5))
    shares = [list(make_loader(data, 64, shuffle=True, seed=5).shard(rank, 4)) for rank in range(4)]
    assert all(len(s) == len(whole) for s in shares)
    for i, (x, y) in enumerate(whole[:-1]):
        assert torch.equal(torch.cat([s[i][0] for s in shares]), x) and torch.equal(torch.cat([s[i][1] for s in shares]), y)
    # The final 29 samples: 7 per rank, the one left over dropped.
    assert [len(s[-1][1]) for s in shares] == [7] * 4
    assert torch.equal(torch.cat([s[-1][1] for s in shares]), whole[-1][1][:28])
    # A final batch that would leave a rank one sample is skipped on every rank.
    tiny = make_loader(data, 64, shuffle=True, seed=5)
    assert len(list(tiny.shard(0, 16))) == len(whole) - 1 == len(tiny)
    with pytest.raises(ValueError, match="multiple of train.workers"):
        make_loader(data, 30, shuffle=True, seed=5).shard(0, 4)


def test_data_parallel_settings_are_checked_with_the_file() -> None:
    def sweep(**changes) -> dict:
        data = tiny_sweep("dp")
        for section, values in changes.items():
            data[section] = {**data[section], **values}
        return data

    spec = load_sweep_spec(sweep(sweep={"resources_per_trial": {"cpu": 1, "workers": 2, "placement": "spread"}}))
    assert spec.trial.train.workers == 2 and spec.settings.rank_resources == {"cpu": 1.0}
    assert spec.trial_config({"train.lr": 0.05}).train.workers == 2
    bad = [
        ({"sweep": {"resources_per_trial": {"cpu": 1, "workers": 0}}}, r"sweep\.resources_per_trial\.workers=0"),
        ({"sweep": {"resources_per_trial": {"cpu": 1, "workers": 2, "gpu": 0.5}}}, r"gpu=0\.5.*NCCL"),
        ({"sweep": {"resources_per_trial": {"cpu": 1, "placement": "near"}}}, r"placement='near'.*pack"),
        ({"sweep": {"resources_per_trial": {"cpu": 1, "workers": 3}}}, r"train\.batch_size=32.*multiple of train\.workers \(3\)"),
        ({"train": {"workers": 2}}, r"train\.workers=2.*sweep\.resources_per_trial\.workers: 2"),
        ({"train": {"workers": 4}, "sweep": {"resources_per_trial": {"cpu": 1, "workers": 2}}}, r"train\.workers=4.*equal to"),
    ]
    for changes, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_sweep_spec(sweep(**changes))
    searched = tiny_sweep("dp")
    searched["search"] = {"train.workers": {"choice": [1, 2]}}
    with pytest.raises(ConfigError, match=r"search\.train\.workers.*fixed for a sweep"):
        load_sweep_spec(searched)


def test_r2sweep_trial_runs_the_ranks_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump({**TRIAL, "train": {**TRIAL["train"], "epochs": 1}}))
    done = cli_main("trial", "trial.yaml", "--out", "out", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "over 2 data-parallel ranks" in done.stderr and "ptq_rtn_w4a8" in done.stdout
    assert (tmp_path / "out" / PRETRAINED).is_file()

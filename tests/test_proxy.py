"""The per-epoch proxy (``proxy/top1``): one downstream result's grid at that result's bit width.

It used to take its recipe from ``downstream[0]`` and its bit width from the
minimum over all entries, so ``[ptq rtn W4, dkm W1]`` ranked every trial on RTN at
1 bit: at chance, with and without R2 (10.0-10.6 on MobileNet-V1 digits, measured),
and ASHA was blind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data import create_data, make_loader
from r2sweep.core.errors import ConfigError
from r2sweep.core.quant.ptq import round_to_nearest
from r2sweep.core.train import evaluate
from r2sweep.core.build import model_from_pretrained
from r2sweep.core.trial import PRETRAINED, run_trial

MIXED = {
    "data": {"name": "synthetic", "num_samples": 160},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4], "granularity": "tensor"},
                   {"method": "dkm", "weight_bits": [1], "epochs": 0}],
}
SWEEP = {**MIXED, "search": {"train.lr": {"loguniform": [0.01, 0.1]}}, "sweep": {"num_samples": 2}}


def test_a_sweep_s_proxy_is_its_objective_s_result() -> None:
    on_ptq = load_sweep_spec({**SWEEP, "objective": {"metric": "ptq_rtn_w4a8/top1"}})
    entry, bits = on_ptq.trial.proxy_target()
    assert (entry.result_name(bits), bits, entry.granularity) == ("ptq_rtn_w4a8", 4, "tensor")
    on_dkm = load_sweep_spec({**SWEEP, "objective": {"metric": "dkm_w1/top1"}})
    entry, bits = on_dkm.trial.proxy_target()
    assert (entry.method, bits) == ("dkm", 1)
    assert load_sweep_spec({**SWEEP, "objective": {"metric": "fp/top1"}}).trial.proxy_target() is None
    # The file's own choice wins, and travels in every trial's config.
    chosen = load_sweep_spec({**SWEEP, "proxy": {"result": "dkm_w1"}, "objective": {"metric": "ptq_rtn_w4a8/top1"}})
    assert chosen.trial.proxy_target()[1] == 1
    assert chosen.trial_mapping({"train.lr": 0.02})["proxy"] == {"result": "dkm_w1"}


def test_a_trial_file_s_default_is_its_first_entry_at_that_entry_s_lowest_width() -> None:
    config = load_trial_config({**MIXED, "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4, 3]},
                                                       {"method": "dkm", "weight_bits": [1]}]})
    entry, bits = config.proxy_target()
    assert (entry.method, bits) == ("ptq", 3)  # never the DKM entry's 1 bit


def test_an_unknown_proxy_result_names_the_field_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"proxy\.result='dkm_w2' is not valid: a downstream result of this trial "
                                          r"or 'fp': \['ptq_rtn_w4a8', 'dkm_w1', 'fp'\]"):
        load_trial_config({**MIXED, "proxy": {"result": "dkm_w2"}})


def test_the_reported_proxy_is_rtn_on_the_objective_entry_s_grid(tmp_path: Path) -> None:
    """The last epoch's proxy, recomputed independently from the saved weights."""
    spec = load_sweep_spec({**SWEEP, "objective": {"metric": "ptq_rtn_w4a8/top1"}})
    config = spec.trial_config({"train.lr": 0.05})
    epochs: list[dict[str, float]] = []
    run_trial(config, lambda m: epochs.append(dict(m)) if "epoch" in m else None, out_dir=tmp_path)
    assert len(epochs) == 2 and all("proxy/top1" in m for m in epochs)

    model = model_from_pretrained(config, tmp_path / PRETRAINED)
    data = create_data("synthetic", seed=config.seed, num_samples=160)
    val = make_loader(data.val, 256, shuffle=False, seed=config.seed)
    entry = config.downstream[0]
    expected = evaluate(round_to_nearest(model, entry, 4), val, torch.device("cpu"))
    one_bit = evaluate(round_to_nearest(model, entry, 1), val, torch.device("cpu"))
    assert epochs[-1]["proxy/top1"] == pytest.approx(expected)
    assert expected != one_bit  # the old proxy's number would not pass

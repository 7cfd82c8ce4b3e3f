"""LSQ+ (r2sweep.core.quant.lsq_plus): the offset grid, its gradients from the paper, its start, a real QAT.

The weight side (LSQ's grid, LSQ+'s start) also runs through the shared quantizer
checks of tests/test_quant_qat.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from r2sweep.core.quant.lsq_plus import LsqPlusQuantizer
from r2sweep.core.quant.qat import LsqQuantizer


def _activation(bits: int, step: float, offset: float) -> LsqPlusQuantizer:
    q = LsqPlusQuantizer(bits, True, per_sample=True, field="downstream.act_bits")
    with torch.no_grad():
        q.step.fill_(step)
        q.offset.fill_(offset)
    q.initialized.fill_(True)
    return q


def test_the_activation_grid_is_shifted_by_the_offset() -> None:
    x = torch.tensor([[-2.0, -1.3, -0.9, -0.2, 0.0, 0.4, 0.8, 3.0]], dtype=torch.float64)
    q = _activation(2, step=0.5, offset=-1.0)  # levels -1.0, -0.5, 0.0, 0.5
    expected = torch.tensor([[-1.0, -1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5]], dtype=torch.float64)
    # -0.2 is 1.6 steps above -1.0: rounds to 2 steps, 0.0; 0.4 is 2.8: 3 steps, 0.5.
    assert torch.equal(q.double()(x), expected)
    assert torch.unique(q(torch.randn(4, 1000))).numel() <= 4


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gradients_are_the_paper_s(bits: int) -> None:
    """s: round(u) - u inside, 0 / Qp clipped low / high; beta: 0 inside, 1 clipped; both times g; x: the STE."""
    torch.manual_seed(bits)
    x = (torch.randn(3, 40, dtype=torch.float64) * 2).requires_grad_()
    q = _activation(bits, step=0.37, offset=-0.8).double()
    upstream = torch.randn_like(x)
    (q(x) * upstream).sum().backward()

    qp = 2**bits - 1
    g = 1.0 / math.sqrt(x[0].numel() * qp)
    u = (x.detach() - (-0.8)) / 0.37
    low, high = u < 0, u > qp
    inside = ~(low | high)
    d_step = torch.where(inside, torch.round(u) - u, torch.where(high, torch.full_like(u, qp), torch.zeros_like(u)))
    d_offset = torch.where(inside, torch.zeros_like(u), torch.ones_like(u))
    torch.testing.assert_close(q.step.grad, (upstream * d_step).sum() * g)
    torch.testing.assert_close(q.offset.grad, (upstream * d_offset).sum() * g)
    torch.testing.assert_close(x.grad, upstream * inside)


def test_the_start_weights_3_std_and_activations_cut_at_3_std() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 300) * torch.tensor([[0.1], [0.5], [1.0], [2.0]]) + 0.05
    weights = LsqPlusQuantizer(2, False, num_channels=4)
    weights(w)
    mean, std = w.mean(dim=1), w.std(dim=1, correction=0)
    torch.testing.assert_close(weights.step.detach(), torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs()) / 2)
    assert not weights.offset.requires_grad and float(weights.offset.abs().max()) == 0.0

    a = torch.randn(8, 500).relu()
    a[0, 0] = 40.0  # one outlier of a calibration batch
    acts = LsqPlusQuantizer(2, True, per_sample=True)
    acts(a)
    high = min(float(a.max()), float(a.mean() + 3 * a.std(correction=0)))
    assert float(acts.offset.detach()) == 0.0  # a ReLU output's minimum: zero stays a level
    torch.testing.assert_close(float(acts.step), high / 3)
    assert high < 5  # the outlier did not stretch the range


def test_a_learned_offset_fits_signed_activations_that_lsq_s_grid_cannot() -> None:
    """A linear bottleneck's output, all of it in [-3, -1]: LSQ's signed 2-bit grid puts
    two of its four levels at or above zero; LSQ+ moves its grid onto the data."""
    torch.manual_seed(0)
    x = torch.rand(64, 32) * 2 - 3
    errors = {}
    for name, quant in {"lsq": LsqQuantizer(2, True, per_sample=True),
                        "lsqplus": LsqPlusQuantizer(2, True, per_sample=True)}.items():
        optimizer = torch.optim.Adam(quant.parameters(), lr=0.01)
        for _ in range(200):
            loss = (quant(x) - x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        errors[name] = float((quant(x) - x).pow(2).mean())
    assert errors["lsqplus"] < 0.5 * errors["lsq"], errors


def test_extra_repr_and_state_round_trip() -> None:
    q = LsqPlusQuantizer(3, True, per_sample=True)
    q(torch.randn(4, 10))
    assert "offset=True" in repr(q)
    fresh = LsqPlusQuantizer(3, True, per_sample=True)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 10) * 5
    assert torch.equal(fresh(x), q(x))


def test_qat_lsqplus_trains_at_w2a2_in_a_real_trial() -> None:
    """A real trial (digits, a small CNN with ReLU, 2-bit weights and activations inside):
    LSQ+ leaves chance (10%) far behind."""
    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.trial import run_trial

    config = load_trial_config({
        "data": {"name": "digits"}, "model": {"name": "small_cnn", "width": 0.5},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.05},
        "downstream": [{"method": "qat", "algorithm": "lsqplus", "weight_bits": 2, "act_bits": 2, "epochs": 1}]})
    final = run_trial(config, device=torch.device("cpu"))
    assert final["qat_lsqplus_w2a2/top1"] > 50, final

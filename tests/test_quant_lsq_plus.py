"""LSQ+ (r2sweep.core.quant.lsq_plus): the offset grid, its gradients from the paper, its start, a real QAT.

LSQ+ also runs through the quantizer checks every QAT quantizer shares, in
tests/test_quant_qat.py (shapes and dtypes, zeros, a step driven far down, training
and state round trips, bad arguments).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from r2sweep.core.quant.learned import mse_interval
from r2sweep.core.quant.lsq_plus import LsqPlusQuantizer
from r2sweep.core.quant.qat import LsqQuantizer


def _activation(bits: int, step: float, offset: float) -> LsqPlusQuantizer:
    q = LsqPlusQuantizer(bits, per_sample=True, field="downstream.act_bits")
    with torch.no_grad():
        q.log_step.fill_(math.log(step))
        q.offset.fill_(offset)
    q.initialized.fill_(True)
    return q


def test_the_activation_grid_is_shifted_by_the_offset() -> None:
    x = torch.tensor([[-2.0, -1.3, -0.9, -0.2, 0.0, 0.4, 0.8, 3.0]], dtype=torch.float64)
    q = _activation(2, step=0.5, offset=-1.0)  # levels -1.0, -0.5, 0.0, 0.5
    expected = torch.tensor([[-1.0, -1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5]], dtype=torch.float64)
    # -0.2 is 1.6 steps above -1.0: rounds to 2 steps, 0.0; 0.4 is 2.8: 3 steps, 0.5.
    torch.testing.assert_close(q.double()(x), expected)  # the step is exp(log s): equal to float rounding
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
    torch.testing.assert_close(q.log_step.grad, (upstream * d_step).sum() * g * 0.37)  # d/d log s = s d/ds
    torch.testing.assert_close(q.offset.grad, (upstream * d_offset).sum() * g)
    torch.testing.assert_close(x.grad, upstream * inside)


def test_the_start_is_3_std_cut_to_the_data_and_activations_cover_the_mse_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 300) * torch.tensor([[0.1], [0.5], [1.0], [2.0]]) + 0.05
    w[0, 0] = 5.0  # an outlier: 3 std stops short of it
    weights = LsqPlusQuantizer(2, num_channels=4)
    weights(w)
    mean, std = w.mean(dim=1), w.std(dim=1, correction=0)
    low = torch.maximum(w.amin(dim=1), mean - 3 * std)
    high = torch.minimum(w.amax(dim=1), mean + 3 * std)
    torch.testing.assert_close(weights.offset.detach(), low)
    torch.testing.assert_close(weights.step.detach(), (high - low) / 3)
    assert float(high[0]) < 1.0
    # A depthwise 3x3 channel: 9 values never reach 3 std ((n - 1) / sqrt(n) = 2.67 at most),
    # so its levels span exactly its own range, where LSQ+'s symmetric rule would reach past it.
    small = torch.randn(2, 9)
    depthwise = LsqPlusQuantizer(2, num_channels=2)
    depthwise(small)
    torch.testing.assert_close(depthwise.offset.detach(), small.amin(dim=1))
    torch.testing.assert_close(depthwise.step.detach(), (small.amax(dim=1) - small.amin(dim=1)) / 3)

    a = torch.randn(8, 500).relu()
    a[0, 0] = 40.0  # one outlier of a calibration batch
    acts = LsqPlusQuantizer(2, per_sample=True)
    acts(a)
    three_std = min(float(a.max()), float(a.mean() + 3 * a.std(correction=0)))
    _, mse_high = mse_interval(a.reshape(1, -1), 2, symmetric=False)
    assert float(acts.offset.detach()) == 0.0  # a ReLU output's minimum: zero stays a level
    torch.testing.assert_close(float(acts.step.detach()), max(three_std, float(mse_high)) / 3)
    assert float(acts.step.detach()) * 3 < 5  # the outlier did not stretch the range

    eight = LsqPlusQuantizer(8, per_sample=True)
    eight(a)
    assert float(eight.step.detach()) * 255 > three_std  # at 8 bits the MSE grid reaches further than 3 std


def test_a_learned_offset_fits_signed_activations_that_lsq_s_grid_cannot() -> None:
    """A linear bottleneck's output, all of it in [-3, -1]: LSQ's signed 2-bit grid puts
    two of its four levels at or above zero; LSQ+ moves its grid onto the data."""
    torch.manual_seed(0)
    x = torch.rand(64, 32) * 2 - 3
    errors = {}
    for name, quant in {"lsq": LsqQuantizer(2, True, per_sample=True),
                        "lsqplus": LsqPlusQuantizer(2, per_sample=True)}.items():
        optimizer = torch.optim.Adam(quant.parameters(), lr=0.01)
        for _ in range(200):
            loss = (quant(x) - x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        errors[name] = float((quant(x) - x).pow(2).mean().detach())
    assert errors["lsqplus"] < 0.5 * errors["lsq"], errors


def test_extra_repr_and_state_round_trip() -> None:
    q = LsqPlusQuantizer(3, per_sample=True)
    q(torch.randn(4, 10))
    assert "bits=3, num_channels=None, per_sample=True" in repr(q)
    fresh = LsqPlusQuantizer(3, per_sample=True)
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

"""A second opinion on r2sweep's quantizers from code written by someone else: torch's own.

torch ships observers that compute quantization parameters
(``torch.ao.quantization.MinMaxObserver`` and ``PerChannelMinMaxObserver``) and
fake-quantize kernels, including LSQ's learnable one
(``torch._fake_quantize_learnable_per_tensor_affine`` and its per-channel twin,
which implement the LSQ paper's gradients in C++). Round-to-nearest is
deterministic, so the values must be equal, not close; LSQ's gradients are
compared to float32 rounding.

Where r2sweep's grid differs from torch's by design, the test says so and compares
the arithmetic on r2sweep's parameters: torch's symmetric observers divide the range
by ``(qmax - qmin) / 2`` (1.5 levels at 2 bits); r2sweep's by ``qmax``, so that the
largest weight lands on a level (R2LOSS.md: the range is what R2 restricts).
The DKM check against coremltools is ``tests/test_quant_dkm.py``; AdaRound's, against
Brevitas's learned rounding, is ``tests/test_quant_adaround_second_opinion.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from r2sweep.core.quant.fake import ActivationQuantizer, QuantSpec, qrange, quantize_weight, weight_qparams
from r2sweep.core.quant.qat import LsqQuantizer

BITS = [2, 3, 4, 8]


def _weight(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 8, 3, 3, generator=generator) * torch.linspace(0.1, 2.0, 16)[:, None, None, None]
    w[3, 0, 0, 0] = 9.0  # an outlier, as R2 exists to remove
    return w


def _observer(bits: int, per_channel: bool):
    kind = PerChannelMinMaxObserver if per_channel else MinMaxObserver
    extra = {"ch_axis": 0} if per_channel else {}
    scheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    return kind(dtype=torch.quint8, qscheme=scheme, quant_min=0, quant_max=2**bits - 1, **extra)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_affine_round_to_nearest_equals_torch_s_observer_and_kernel(bits: int, granularity: str) -> None:
    w = _weight()
    observer = _observer(bits, granularity == "channel")
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    if granularity == "channel":
        theirs = torch.fake_quantize_per_channel_affine(w, scale, zero_point.int(), 0, 0, 2**bits - 1)
    else:
        theirs = torch.fake_quantize_per_tensor_affine(w, float(scale), int(zero_point), 0, 2**bits - 1)
    mine = quantize_weight(w, QuantSpec(bits, symmetric=False, granularity=granularity, range="minmax"))
    my_scale, my_zero = weight_qparams(w, QuantSpec(bits, symmetric=False, granularity=granularity, range="minmax"))
    assert torch.allclose(my_scale.flatten(), scale.flatten(), rtol=1e-6, atol=0)
    assert torch.equal(my_zero.flatten().long(), zero_point.flatten().long())
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("value_range", ["minmax", "mse"])
def test_symmetric_rounding_on_r2sweep_s_grid_equals_torch_s_kernel(bits: int, granularity: str, value_range: str) -> None:
    w = _weight(1)
    spec = QuantSpec(bits, symmetric=True, granularity=granularity, range=value_range)
    scale, _ = weight_qparams(w, spec)
    qmin, qmax = qrange(bits, True)
    zeros = torch.zeros(w.shape[0] if granularity == "channel" else 1, dtype=torch.int32)
    if granularity == "channel":
        theirs = torch.fake_quantize_per_channel_affine(w, scale.flatten(), zeros, 0, qmin, qmax)
    else:
        theirs = torch.fake_quantize_per_tensor_affine(w, float(scale), 0, qmin, qmax)
    assert torch.equal(quantize_weight(w, spec), theirs)
    if value_range == "minmax":  # the grid's top level is the largest |w| (per row)
        rows = w.abs().flatten(1).amax(dim=1) if granularity == "channel" else w.abs().max()
        assert torch.allclose(scale.flatten() * qmax, rows.flatten())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_calibrated_unsigned_activations_equal_torch_s_observer_and_kernel(bits: int) -> None:
    batches = [torch.relu(torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(i))) * (i + 1) for i in range(3)]
    mine = ActivationQuantizer(bits, signed=False)
    mine.calibrating = True
    observer = _observer(bits, per_channel=False)
    for batch in batches:
        mine(batch)
        observer(batch)
    mine.calibrating = False
    scale, zero_point = observer.calculate_qparams()
    probe = torch.relu(torch.randn(64, 4, 5, 5)) * 4
    theirs = torch.fake_quantize_per_tensor_affine(probe, float(scale), int(zero_point), 0, 2**bits - 1)
    assert int(zero_point) == 0
    assert torch.allclose(mine(probe), theirs, rtol=0, atol=float(scale) * 1e-6)


def _lsq_pair(bits: int, signed: bool, per_channel: bool, x: torch.Tensor, step: torch.Tensor | None = None):
    """r2sweep's LSQ and torch's learnable kernel on ``x``: values, x's and the step's gradients."""
    channels = x.shape[0] if per_channel else None
    quantizer = LsqQuantizer(bits, signed, num_channels=channels, per_sample=not per_channel, field="downstream.act_bits")
    quantizer(x)  # initializes the step from x
    with torch.no_grad():
        # 0.7 of LSQ's initial step clips a few values, so the clipped branches are compared too.
        quantizer.step.copy_(quantizer.step * 0.7 if step is None else step)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    factor = quantizer.grad_scale(x)
    assert factor == pytest.approx(1 / math.sqrt(x[0].numel() * qmax))  # per sample, or per channel's elements
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))

    mine_x = x.clone().requires_grad_(True)
    mine = quantizer(mine_x)
    mine.backward(upstream)
    their_x = x.clone().requires_grad_(True)
    step = quantizer.step.detach().clone().reshape(-1).requires_grad_(True)
    if per_channel:
        theirs = torch._fake_quantize_learnable_per_channel_affine(their_x, step, torch.zeros_like(step), 0, qmin, qmax,
                                                                   factor)
    else:
        theirs = torch._fake_quantize_learnable_per_tensor_affine(their_x, step, torch.zeros(1), qmin, qmax, factor)
    theirs.backward(upstream)
    ratio = x / quantizer.step.detach().reshape((-1, *([1] * (x.dim() - 1))) if per_channel else ())
    used = quantizer.step.detach().clone()
    return (mine, mine_x.grad, quantizer.step.grad.reshape(-1)), (theirs.detach(), their_x.grad, step.grad), ratio, \
        (qmin, qmax), used


def _lsq_against_torch(bits: int, signed: bool, per_channel: bool) -> None:
    x = torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(bits)) * 2
    x = x.relu() if not signed else x
    # The one place the two differ by design (the test below): values within half a step
    # beyond the grid's ends. Those are moved one step further out, the step kept, so that
    # every other branch is compared.
    *_, ratio, (qmin, qmax), step = _lsq_pair(bits, signed, per_channel, x)
    band = ((ratio > qmax) & (ratio < qmax + 0.5)) | ((ratio < qmin) & (ratio > qmin - 0.5))
    x = torch.where(band, x + torch.sign(x) * step.reshape(ratio.shape[:1] + (1,) * (x.dim() - 1) if per_channel else ()), x)
    (mine, mine_dx, mine_ds), (theirs, their_dx, their_ds), ratio, (qmin, qmax), _ = _lsq_pair(bits, signed, per_channel,
                                                                                               x, step)
    assert bool(((ratio > qmax + 0.5) | (ratio < qmin - 0.5)).any()), "some values clipped"
    assert torch.equal(mine, theirs), "the forward: exactly the same levels"
    # x's gradient: the same pass-through mask exactly; the values to float32 rounding
    # (r2sweep's goes through x / s and back times s, torch's kernel copies it).
    assert torch.equal(mine_dx != 0, their_dx != 0), "the STE's mask for x"
    assert torch.allclose(mine_dx, their_dx, rtol=1e-6, atol=0), "the STE for x"
    assert torch.allclose(mine_ds, their_ds, rtol=1e-4, atol=1e-6), "LSQ's step gradient"


def test_lsq_differs_from_torch_s_kernel_only_within_half_a_step_beyond_the_grid() -> None:
    # LSQ's paper passes x's gradient where -Qn <= x/s <= Qp; torch's kernel where
    # round(x/s) is in range, half a step further. r2sweep follows the paper.
    x = torch.tensor([[0.5, 1.2, 3.3, 2.9, -4.3, -4.7]])
    quantizer = LsqQuantizer(3, True, per_sample=True, field="downstream.act_bits")
    quantizer(x)
    with torch.no_grad():
        quantizer.step.fill_(1.0)
    mine_x, their_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    quantizer(mine_x).sum().backward()
    torch._fake_quantize_learnable_per_tensor_affine(their_x, torch.ones(1, requires_grad=True), torch.zeros(1), -4, 3,
                                                     1.0).sum().backward()
    assert mine_x.grad.tolist() == [[1, 1, 0, 1, 0, 0]]  # 3.3 > Qp = 3, -4.3 < -Qn = -4: clipped
    assert their_x.grad.tolist() == [[1, 1, 1, 1, 1, 0]]  # round(3.3) = 3, round(-4.3) = -4: inside for torch


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_per_tensor_values_and_gradients_equal_torch_s_learnable_kernel(bits: int, signed: bool) -> None:
    _lsq_against_torch(bits, signed, per_channel=False)


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_per_channel_values_and_gradients_equal_torch_s_learnable_kernel(bits: int) -> None:
    _lsq_against_torch(bits, True, per_channel=True)

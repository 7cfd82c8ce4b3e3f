"""QAT fake quantizers (LSQ, EWGS, LSQ+'s weights): hand-computed grids and gradients, training, state round-trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.quant.lsq_plus import LsqPlusQuantizer
from r2sweep.core.quant.qat import DEFAULT_EWGS_DELTA, EwgsQuantizer, LsqQuantizer

BITS = range(1, 9)


def _set(quant: nn.Module, **values: float | Tensor) -> nn.Module:
    """Give ``quant`` known parameters and mark it initialized, so forward keeps them."""
    with torch.no_grad():
        for name, value in values.items():
            getattr(quant, name).copy_(torch.as_tensor(value, dtype=torch.float64))
    quant.initialized.fill_(True)
    return quant


def _levels(x: Tensor) -> int:
    return int(torch.unique(x).numel())


def _grid(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) straight from the paper."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


# --- LSQ: forward -------------------------------------------------------------------


def test_lsq_forward_by_hand() -> None:
    # 3-bit signed: Qn = 4, Qp = 3, s = 0.5.
    # x/s = [-6, -3.8, -1.52, -0.2, 0.4, 1.48, 2.6, 4] -> clamp [-4, 3] -> round
    # [-4, -4, -2, 0, 0, 1, 3, 3] -> times s.
    q = _set(LsqQuantizer(3, True), step=0.5)
    x = torch.tensor([-3.0, -1.9, -0.76, -0.1, 0.2, 0.74, 1.3, 2.0])
    assert torch.equal(q(x), torch.tensor([-2.0, -2.0, -1.0, 0.0, 0.0, 0.5, 1.5, 1.5]))
    # 2-bit unsigned: Qn = 0, Qp = 3; x/s = [-2, 0.4, 0.6, 1.6, 2.4, 10] -> [0, 0, 1, 2, 2, 3].
    q = _set(LsqQuantizer(2, False), step=0.5)
    x = torch.tensor([-1.0, 0.2, 0.3, 0.8, 1.2, 5.0])
    assert torch.equal(q(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.5]))


def test_lsq_one_bit_signed_is_scaled_sign() -> None:
    q = _set(LsqQuantizer(1, True), step=0.5)
    x = torch.tensor([-1.0, -0.2, 0.0, 0.3, 4.0])
    assert torch.equal(q(x), torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.5]))  # sign(0) -> +1
    # 1-bit unsigned is the ordinary grid {0, s}.
    q = _set(LsqQuantizer(1, False), step=0.5)
    assert torch.equal(q(x), torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5]))


def test_lsq_per_channel_forward_by_hand() -> None:
    q = _set(LsqQuantizer(2, True, num_channels=2), step=torch.tensor([1.0, 0.1]))
    x = torch.tensor([[0.4, 0.6, -3.0], [0.04, 0.06, -0.3]])
    # Row 0 on {-2, -1, 0, 1} * 1; row 1 the same grid * 0.1.
    torch.testing.assert_close(q(x), torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.1, -0.2]]))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_at_most_2_pow_b_levels(bits: int, signed: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(4, 300) * 2
    for quant in (LsqQuantizer(bits, signed), LsqQuantizer(bits, signed, num_channels=4)):
        out = quant(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        for row in out:
            assert 2 <= _levels(row) <= 2**bits
        assert not torch.equal(out, x)


def test_lsq_init_from_first_tensor() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40) * torch.tensor([[1.0], [4.0], [0.1]])
    for bits in (2, 4, 8):
        q = LsqQuantizer(bits, True)
        q(x)
        _, qp = _grid(bits, True)
        torch.testing.assert_close(q.step.detach(), 2 * x.abs().mean() / math.sqrt(qp))
        assert bool(q.initialized)
    q = LsqQuantizer(4, False, num_channels=3)
    q(x)
    torch.testing.assert_close(q.step.detach(), 2 * x.abs().mean(dim=1) / math.sqrt(15))
    # 1-bit signed: s = mean|x|, the least-squares step of s * sign(x).
    q = LsqQuantizer(1, True, num_channels=3)
    q(x)
    torch.testing.assert_close(q.step.detach(), x.abs().mean(dim=1))
    # Later tensors do not re-initialize.
    before = q.step.detach().clone()
    q(x * 100)
    assert torch.equal(q.step.detach(), before)


# --- LSQ: gradients -----------------------------------------------------------------


def _lsq_step_grad_by_hand(x: Tensor, s: Tensor, bits: int, signed: bool) -> Tensor:
    """Per-element d x_hat / d s from the LSQ paper (before the gradient scale)."""
    v = x / s
    if bits == 1 and signed:
        sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return torch.where(v.abs() <= 1, -v + sign, sign)
    qn, qp = _grid(bits, signed)
    inside = -v + torch.round(v)
    return torch.where(v < -qn, torch.full_like(v, -qn), torch.where(v > qp, torch.full_like(v, qp), inside))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_step_gradient_matches_paper(bits: int, signed: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(5, 7, dtype=torch.float64) * 1.5
    upstream = torch.randn(5, 7, dtype=torch.float64)  # non-uniform, mixed signs
    s = 0.3 if bits < 8 else 0.01
    q = _set(LsqQuantizer(bits, signed).double(), step=s)
    q(x).mul(upstream).sum().backward()
    _, qp = _grid(bits, signed)
    g = 1 / math.sqrt(x.numel() * (1 if bits == 1 and signed else qp))
    assert q.grad_scale(x) == pytest.approx(g)
    expected = g * (upstream * _lsq_step_grad_by_hand(x, torch.tensor(s, dtype=torch.float64), bits, signed)).sum()
    torch.testing.assert_close(q.step.grad, expected)
    # Data with plenty of both clipped and inside elements, so all three branches count.
    v = x / s
    if not (bits == 1 and signed):
        assert ((v > qp) | (v < -_grid(bits, signed)[0])).any()


@pytest.mark.parametrize("bits", [1, 3])
def test_lsq_per_channel_step_gradient(bits: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 2, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64).view(3, 1, 1)
    steps = torch.tensor([0.4, 0.9, 0.05], dtype=torch.float64)
    q = _set(LsqQuantizer(bits, True, num_channels=3).double(), step=steps)
    upstream = torch.randn_like(x)
    q(x).mul(upstream).sum().backward()
    _, qp = _grid(bits, True)
    g = 1 / math.sqrt(10 * (1 if bits == 1 else qp))  # N = elements per channel
    per_element = _lsq_step_grad_by_hand(x, steps.view(3, 1, 1), bits, True)
    torch.testing.assert_close(q.step.grad, g * (upstream * per_element).sum(dim=(1, 2)))


def test_lsq_per_sample_gradient_scale() -> None:
    x = torch.rand(8, 3, 4, dtype=torch.float64)
    q = _set(LsqQuantizer(4, False, per_sample=True).double(), step=0.05)
    # N = x[0].numel() = 12 features per sample, not 96 elements.
    assert q.grad_scale(x) == pytest.approx(1 / math.sqrt(12 * 15))
    q(x).sum().backward()
    expected = q.grad_scale(x) * _lsq_step_grad_by_hand(x, torch.tensor(0.05, dtype=torch.float64), 4, False).sum()
    torch.testing.assert_close(q.step.grad, expected)
    assert LsqQuantizer(4, False).grad_scale(x) == pytest.approx(1 / math.sqrt(96 * 15))


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_ste_for_x(bits: int, signed: bool) -> None:
    x = torch.linspace(-6, 6, 81, dtype=torch.float64).add(0.013).requires_grad_()
    q = _set(LsqQuantizer(bits, signed).double(), step=0.5)
    q(x).sum().backward()
    v = x.detach() / 0.5
    lo, hi = (-1, 1) if bits == 1 and signed else (-_grid(bits, signed)[0], _grid(bits, signed)[1])
    inside = ((v >= lo) & (v <= hi)).to(x.dtype)
    assert torch.equal(x.grad, inside)
    assert 0 < inside.sum() < x.numel()


# --- EWGS ---------------------------------------------------------------------------


def test_ewgs_forward_by_hand() -> None:
    # 2 bits on [l, u] = [-1, 2]: levels {-1, 0, 1, 2}.
    # x_n * 3 = x + 1 = [-2 -> 0, 0.4, 0.6, 1.6, 2.2, 10 -> 3] -> round [0, 0, 1, 2, 2, 3].
    q = _set(EwgsQuantizer(2, True), lower=-1.0, upper=2.0)
    x = torch.tensor([-3.0, -0.6, -0.4, 0.6, 1.2, 9.0])
    torch.testing.assert_close(q(x), torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0, 2.0]))
    # 1 bit signed: the two levels {l, u}, split at the midpoint.
    q = _set(EwgsQuantizer(1, True), lower=-0.5, upper=0.5)
    torch.testing.assert_close(q(torch.tensor([-2.0, -0.1, 0.1, 3.0])), torch.tensor([-0.5, -0.5, 0.5, 0.5]))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_ewgs_at_most_2_pow_b_levels(bits: int, signed: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(4, 300) * 2
    for quant in (EwgsQuantizer(bits, signed), EwgsQuantizer(bits, signed, num_channels=4)):
        out = quant(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        for row in out:
            assert 2 <= _levels(row) <= 2**bits
        if not signed:
            assert float(out.detach().min()) == 0.0  # zero stays exact on the unsigned grid


def _ewgs_by_hand(
    x: Tensor, lower: float, upper: float, bits: int, delta: float, upstream: Tensor
) -> dict[str, Tensor]:
    """x, l and u gradients of ``sum(upstream * EWGS(x))`` derived on paper."""
    width = upper - lower
    steps = 2**bits - 1
    x_n = ((x - lower) / width).clamp(0, 1)
    x_q = torch.round(x_n * steps) / steps
    inside = ((x - lower) / width >= 0) & ((x - lower) / width <= 1)
    scale = 1 + delta * torch.sign(upstream) * (x_n - x_q)  # sign(g_xq) = sign(upstream): width > 0
    # out = l + x_q w; inside, x_q moves with x_n = (x - l) / w at the rate `scale`.
    d_x = torch.where(inside, upstream * scale, torch.zeros_like(x))
    d_u = upstream * (x_q - torch.where(inside, scale * x_n, torch.zeros_like(x)))
    d_l = upstream * (1 - x_q - torch.where(inside, scale * (1 - x_n), torch.zeros_like(x)))
    return {"x": d_x, "upper": d_u.sum(), "lower": d_l.sum()}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("delta", [0.0, DEFAULT_EWGS_DELTA, 0.3, 2.0])
def test_ewgs_gradients_match_formula(bits: int, delta: float) -> None:
    torch.manual_seed(bits)
    x = (torch.randn(60, dtype=torch.float64) * 1.2).requires_grad_()
    upstream = torch.randn(60, dtype=torch.float64)  # mixed signs, non-uniform
    q = _set(EwgsQuantizer(bits, True, delta=delta).double(), lower=-1.0, upper=1.5)
    q(x).mul(upstream).sum().backward()
    expected = _ewgs_by_hand(x.detach(), -1.0, 1.5, bits, delta, upstream)
    torch.testing.assert_close(x.grad, expected["x"])
    torch.testing.assert_close(q.upper.grad, expected["upper"])
    torch.testing.assert_close(q.lower.grad, expected["lower"])
    inside = expected["x"] != 0
    if delta == 0:
        torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))  # plain STE
    elif delta >= 0.3:
        assert not torch.allclose(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_ewgs_scaling_pushes_towards_the_helpful_level() -> None:
    # x_n above its level (x_n - x_q > 0): a positive gradient (the loss wants x
    # smaller, towards the level) is amplified, a negative one damped.
    q = _set(EwgsQuantizer(2, True, delta=1.0).double(), lower=0.0, upper=3.0)
    x = torch.tensor([1.3, 1.3], dtype=torch.float64, requires_grad=True)  # x_n - x_q = 0.1
    q(x).mul(torch.tensor([1.0, -1.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.1, -0.9], dtype=torch.float64))


def test_ewgs_unsigned_keeps_lower_at_zero() -> None:
    q = EwgsQuantizer(3, False, delta=0.2)
    x = torch.randn(16, 8).relu()
    q(x).square().sum().backward()
    assert float(q.lower) == 0.0 and q.lower.grad is None and not q.lower.requires_grad
    assert q.upper.grad is not None and float(q.upper.grad) != 0.0
    torch.testing.assert_close(q.upper.detach(), torch.minimum(x.max(), x.mean() + 3 * x.std(correction=0)))


def test_ewgs_init() -> None:
    torch.manual_seed(0)
    # Uniform (range-restricted) data: 3 std reaches past max|x|, so [min, max].
    uniform = torch.rand(1000) * 2 - 1
    q = EwgsQuantizer(3, True)
    q(uniform)
    torch.testing.assert_close(q.lower.detach(), uniform.min())
    torch.testing.assert_close(q.upper.detach(), uniform.max())
    # Heavy tails: 3 std clips the outliers.
    heavy = torch.cat([torch.randn(1000), torch.tensor([40.0, -40.0])])
    q = EwgsQuantizer(3, True)
    q(heavy)
    mean, std = heavy.mean(), heavy.std(correction=0)
    torch.testing.assert_close(q.lower.detach(), mean - 3 * std)
    torch.testing.assert_close(q.upper.detach(), mean + 3 * std)
    # Per channel, and 1 bit = +-mean|x|.
    w = torch.randn(3, 50) * torch.tensor([[1.0], [5.0], [0.2]])
    q = EwgsQuantizer(1, True, num_channels=3)
    q(w)
    torch.testing.assert_close(q.upper.detach(), w.abs().mean(dim=1))
    torch.testing.assert_close(q.lower.detach(), -w.abs().mean(dim=1))
    before = q.upper.detach().clone()
    q(w * 10)
    assert torch.equal(q.upper.detach(), before)


def test_ewgs_cover_mse_range_widens_where_3_std_clips() -> None:
    from r2sweep.core.quant.fake import QuantSpec, weight_qparams

    torch.manual_seed(0)
    relu_like = torch.relu(torch.randn(20000)) ** 2  # a long right tail, like activations after ReLU
    upper_3std = torch.minimum(relu_like.max(), relu_like.mean() + 3 * relu_like.std(correction=0))
    for bits in (2, 8):
        plain = EwgsQuantizer(bits, False)
        plain(relu_like)
        torch.testing.assert_close(plain.upper.detach(), upper_3std)
        covered = EwgsQuantizer(bits, False, cover_mse_range=True)
        covered(relu_like)
        scale, _ = weight_qparams(relu_like[None], QuantSpec(bits, symmetric=False, granularity="channel", range="mse"))
        torch.testing.assert_close(covered.upper.detach(), torch.maximum(upper_3std, scale.reshape(()) * (2**bits - 1)))
        assert covered.lower.item() == 0.0
    # At 8 bits the MSE grid reaches far past 3 std; the interval then is that grid, levels and all.
    assert covered.upper.item() > 2 * upper_3std.item()
    # Signed data widens on both sides; a large input is subsampled, the same way every time.
    signed = torch.randn(3, 100000) * torch.tensor([[1.0], [2.0], [0.5]]) ** 3
    first, again = (EwgsQuantizer(8, True, num_channels=3, cover_mse_range=True) for _ in range(2))
    first(signed), again(signed)
    assert torch.equal(first.upper, again.upper) and torch.equal(first.lower, again.lower)
    mean, std = signed.mean(dim=1), signed.std(dim=1, correction=0)
    sample = signed[:, torch.randperm(signed.shape[1], generator=torch.Generator().manual_seed(0))[:65536]]
    scale, _ = weight_qparams(sample, QuantSpec(8, symmetric=True, granularity="channel", range="mse"))
    scale = scale.reshape(-1)
    torch.testing.assert_close(first.lower.detach(), torch.minimum(torch.maximum(signed.amin(dim=1), mean - 3 * std), -128 * scale))
    torch.testing.assert_close(first.upper.detach(), torch.maximum(torch.minimum(signed.amax(dim=1), mean + 3 * std), 127 * scale))


def test_qat_covers_the_mse_range_for_ewgs_activations_only() -> None:
    from r2sweep.core.quant.finetune import quantization_aware_train
    from r2sweep.core.quant.methods import QATConfig

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    cfg = QATConfig(algorithm="ewgs", weight_bits=[2], act_bits=2, epochs=0)
    quantized = quantization_aware_train(model, cfg, 2, [], torch.randn(16, 1, 8, 8), torch.device("cpu"))
    quantizers = {name: m for name, m in quantized.named_modules() if isinstance(m, EwgsQuantizer)}
    assert quantizers and all(m.cover_mse_range == name.endswith("input_quantizer") for name, m in quantizers.items())


# --- both ---------------------------------------------------------------------------

MAKERS = {
    "lsq": lambda bits, signed, **kw: LsqQuantizer(bits, signed, **kw),
    "ewgs": lambda bits, signed, **kw: EwgsQuantizer(bits, signed, delta=0.1, **kw),
    # LSQ+ has no signed switch (its offset places the grid); its own checks: tests/test_quant_lsq_plus.py.
    "lsqplus": lambda bits, signed, **kw: LsqPlusQuantizer(bits, **kw),
}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype_preserved(kind: str, dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 4, 4).to(dtype).requires_grad_()
    q = MAKERS[kind](4, True, num_channels=2)
    out = q(x)
    assert out.shape == x.shape and out.dtype == dtype
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype


@pytest.mark.parametrize("kind", list(MAKERS))
def test_zero_tensor_is_finite(kind: str) -> None:
    w = torch.zeros(3, 4, requires_grad=True)
    q = MAKERS[kind](3, True, num_channels=3)
    out = q(w)
    assert torch.equal(out, torch.zeros_like(w))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_step_driven_far_below_zero_stays_finite(kind: str) -> None:
    # An optimizer can overshoot a step (or width) to large negative values; the
    # forward uses the smallest step instead and must not divide by an exact zero.
    x = torch.randn(4, 9, requires_grad=True)
    far_below = {"lsq": {"step": -3.3654}, "ewgs": {"lower": 0.5, "upper": -2.9},
                 "lsqplus": {"log_step": -300.0, "offset": 0.0}}  # exp(-300) is an exact 0 in float32
    q = _set(MAKERS[kind](2, True), **far_below[kind])
    out = q(x)
    floor = 0.5 if kind == "ewgs" else 0.0  # LSQ+: its offset  # every value on the one level left: 0, or EWGS's lower end
    assert torch.isfinite(out).all() and (out - floor).abs().max() < 1e-6
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in q.parameters() if p.grad is not None)


def test_channel_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        LsqQuantizer(4, True, num_channels=3)(torch.randn(4, 2))
    with pytest.raises(ValueError, match="3 channels"):
        EwgsQuantizer(4, True, num_channels=3)(torch.randn(2, 3))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_training_fits_and_state_dict_round_trips(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    w_true = torch.randn(4, 16) * 0.5
    target = x.relu() @ w_true.T
    weight = nn.Parameter(torch.randn(4, 16) * 0.5)
    w_quant = MAKERS[kind](3, True, num_channels=4)
    a_quant = LsqQuantizer(4, False, per_sample=True, field="downstream.act_bits")
    # Built before the first forward: lazy initialization writes in place.
    opt = torch.optim.Adam([weight, *w_quant.parameters(), *a_quant.parameters()], lr=0.02)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(a_quant(x.relu()) @ w_quant(weight).T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.2 * losses[0]

    state = w_quant.state_dict()
    assert bool(state["initialized"])
    fresh = MAKERS[kind](3, True, num_channels=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(weight.detach()), w_quant(weight.detach()))
    fresh(weight.detach() * 50)  # would re-initialize if the flag were lost
    for name, value in state.items():
        assert torch.equal(fresh.state_dict()[name], value), name

    # Loading into a quantizer that had already initialized itself replaces its values ...
    used = MAKERS[kind](3, True, num_channels=4)
    used(weight.detach() * 50)
    used.load_state_dict(state)
    assert torch.equal(used(weight.detach()), w_quant(weight.detach()))
    # ... and loading a never-initialized state makes it initialize again on the next call.
    used.load_state_dict(MAKERS[kind](3, True, num_channels=4).state_dict())
    used(weight.detach() * 2)
    reference = MAKERS[kind](3, True, num_channels=4)
    reference(weight.detach() * 2)
    assert bool(used.initialized)
    for name, value in reference.state_dict().items():
        assert torch.equal(used.state_dict()[name], value), name


def test_reset_reinitializes() -> None:
    q = LsqQuantizer(4, True)
    q(torch.ones(10))
    q.reset()
    q(torch.full((10,), 3.0))
    torch.testing.assert_close(q.step.detach(), torch.tensor(6.0 / math.sqrt(7)))


def test_extra_repr() -> None:
    assert "bits=4, signed=False" in repr(LsqQuantizer(4, False, per_sample=True))
    assert "delta=0.25" in repr(EwgsQuantizer(2, True, delta=0.25))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(MAKERS))
def test_cuda(kind: str) -> None:
    q = MAKERS[kind](4, True, num_channels=3).cuda()
    x = torch.randn(3, 50, device="cuda", requires_grad=True)
    out = q(x)
    out.square().sum().backward()
    assert out.device.type == "cuda" and x.grad is not None and q.initialized.device.type == "cuda"
    assert _levels(out[0]) <= 16
    cpu = MAKERS[kind](4, True, num_channels=3)
    cpu.load_state_dict({k: v.cpu() for k, v in q.state_dict().items()})
    torch.testing.assert_close(cpu(x.detach().cpu()), out.detach().cpu())


# --- bad arguments ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "4"])
@pytest.mark.parametrize("field", [None, "downstream.act_bits"])
def test_bad_bits(kind: str, bits: object, field: str | None) -> None:
    kwargs = {} if field is None else {"field": field}
    with pytest.raises(ConfigError) as info:
        MAKERS[kind](bits, True, **kwargs)
    expected = field or "downstream.weight_bits"
    assert info.value.field == expected and expected in str(info.value)


@pytest.mark.parametrize("delta", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_delta(delta: object) -> None:
    with pytest.raises(ConfigError) as info:
        EwgsQuantizer(2, True, delta=delta)  # type: ignore[arg-type]
    assert info.value.field == "downstream.delta"
    # The delta field sits in the same section as the bits field the caller names.
    with pytest.raises(ConfigError) as info:
        EwgsQuantizer(2, True, delta=delta, field="downstream[1].act_bits")  # type: ignore[arg-type]
    assert info.value.field == "downstream[1].delta"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: LsqQuantizer(2, "yes"), "downstream.symmetric"),  # type: ignore[arg-type]
        (lambda: EwgsQuantizer(2, 1, field="downstream.act_bits"), "downstream.act_signed"),  # type: ignore[arg-type]
        (lambda: LsqQuantizer(2, None, field="downstream[0].weight_bits"), "downstream[0].symmetric"),  # type: ignore
        (lambda: LsqQuantizer(2, True, num_channels=0), "num_channels"),
        (lambda: EwgsQuantizer(2, True, num_channels=2.0), "num_channels"),  # type: ignore[arg-type]
        (lambda: LsqQuantizer(2, False, num_channels=4, per_sample=True), "per_sample"),
    ],
)
def test_other_bad_arguments(make, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field

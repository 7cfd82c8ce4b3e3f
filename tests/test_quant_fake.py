"""Fake quantization (levels, ranges, hand-computed cases) and BatchNorm folding/re-estimation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.models import create_model, list_models
from r2sweep.core.quant import (
    ActivationQuantizer,
    QuantSpec,
    conv_bn_pairs,
    fake_quantize,
    fold_batchnorm,
    qrange,
    quantize_weight,
    reestimate_bn,
    weight_qparams,
)

ALL_SPECS = [
    QuantSpec(bits, symmetric, granularity, range_)
    for bits in range(1, 9)
    for symmetric in (True, False)
    for granularity in ("tensor", "channel")
    for range_ in ("minmax", "mse")
]


def _levels(x: torch.Tensor) -> int:
    return int(torch.unique(x).numel())


# --- weights ------------------------------------------------------------------------


def test_qrange() -> None:
    assert qrange(2, True) == (-2, 1)
    assert qrange(8, True) == (-128, 127)
    assert qrange(2, False) == (0, 3)
    assert qrange(1, False) == (0, 1)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_at_most_2_pow_b_levels(spec: QuantSpec) -> None:
    torch.manual_seed(spec.bits)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 0.1, 3.0, 0.5]).view(4, 1, 1, 1)
    w_hat = quantize_weight(w, spec)
    assert w_hat.shape == w.shape and torch.isfinite(w_hat).all()
    rows = w_hat.reshape(4, -1) if spec.granularity == "channel" else w_hat.reshape(1, -1)
    for row in rows:
        assert _levels(row) <= 2**spec.bits
    assert not torch.equal(w_hat, w)  # continuous data cannot survive on 2^b levels


def test_qparams_shapes() -> None:
    w = torch.randn(5, 2, 3, 3)
    scale, zp = weight_qparams(w, QuantSpec(4, granularity="tensor"))
    assert scale.shape == () and zp.shape == ()
    scale, zp = weight_qparams(w, QuantSpec(4, symmetric=False, granularity="channel", range="mse"))
    assert scale.shape == (5, 1, 1, 1) and zp.shape == (5, 1, 1, 1)
    scale, _ = weight_qparams(torch.randn(6, 7), QuantSpec(3, granularity="channel"))
    assert scale.shape == (6, 1)


def test_two_bit_symmetric_minmax_by_hand() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    # s = max|x| / qmax = 1 / 1; round(-0.5) = -0 (half to even); grid {-2, -1, 0, 1} * s.
    expected = torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0])
    assert torch.equal(quantize_weight(x, QuantSpec(2)), expected)
    scale, zp = weight_qparams(x, QuantSpec(2))
    assert float(scale) == 1.0 and float(zp) == 0.0


def test_three_bit_symmetric_and_asymmetric_by_hand() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    # s = 1/3: x/s = [-3, -1.5, 0, 0.75, 3] -> [-3, -2, 0, 1, 3].
    expected = torch.tensor([-1.0, -2 / 3, 0.0, 1 / 3, 1.0])
    torch.testing.assert_close(quantize_weight(x, QuantSpec(3)), expected)
    # Asymmetric 2 bits on [-1, 2]: s = 3/3 = 1, z = round(1) = 1, grid {-1, 0, 1, 2}.
    y = torch.tensor([-1.0, -0.4, 0.6, 2.0])
    torch.testing.assert_close(quantize_weight(y, QuantSpec(2, symmetric=False)), torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    scale, zp = weight_qparams(y, QuantSpec(2, symmetric=False))
    assert float(scale) == 1.0 and float(zp) == 1.0


def test_fake_quantize_formula() -> None:
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 9.0])
    out = fake_quantize(x, torch.tensor(0.5), torch.tensor(2.0), 0, 7)
    # q = clamp(round(x / 0.5) + 2, 0, 7) = [0, 1, 2, 3, 7]; x_hat = (q - 2) * 0.5.
    torch.testing.assert_close(out, torch.tensor([-1.0, -0.5, 0.0, 0.5, 2.5]))


@pytest.mark.parametrize("range_", ["minmax", "mse"])
def test_one_bit_is_scaled_sign(range_: str) -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    s = 1.0 if range_ == "minmax" else float(x.abs().mean())
    out = quantize_weight(x, QuantSpec(1, range=range_))
    torch.testing.assert_close(out, torch.tensor([-s, -s, s, s, s]))  # sign(0) -> +1


def test_one_bit_mse_is_optimal_and_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 50) * torch.tensor([[1.0], [5.0], [0.2]])
    out = quantize_weight(w, QuantSpec(1, granularity="channel", range="mse"))
    for row, q in zip(w, out):
        s = row.abs().mean()
        assert set(q.tolist()) <= {float(s), float(-s)}
        err = (row - q).pow(2).sum()
        for other in (0.9 * s, 1.1 * s):
            assert err <= (row - other * torch.where(row >= 0, 1.0, -1.0)).pow(2).sum()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_mse_beats_minmax_on_heavy_tails(bits: int, symmetric: bool, granularity: str) -> None:
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(4.0).sample((4, 256))
    errors = {
        range_: float((quantize_weight(w, QuantSpec(bits, symmetric, granularity, range_)) - w).pow(2).sum())
        for range_ in ("minmax", "mse")
    }
    assert errors["mse"] <= errors["minmax"]
    assert errors["mse"] < 0.9 * errors["minmax"]  # clipping the tails pays off clearly


@pytest.mark.parametrize("range_", ["minmax", "mse"])
def test_per_channel_scales_are_independent(range_: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3)
    spec = QuantSpec(4, granularity="channel", range=range_)
    scales, _ = weight_qparams(w, spec)
    changed = w.clone()
    changed[1] *= 100.0
    new_scales, _ = weight_qparams(changed, spec)
    assert torch.equal(new_scales[0], scales[0]) and torch.equal(new_scales[2], scales[2])
    torch.testing.assert_close(new_scales[1], scales[1] * 100.0)
    # Each channel alone gives the same scale as within the tensor.
    alone, _ = weight_qparams(w[2], QuantSpec(4, range=range_))
    torch.testing.assert_close(scales[2].reshape(()), alone)


@pytest.mark.parametrize("symmetric", [True, False])
def test_eight_bits_is_nearly_lossless(symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    out = quantize_weight(w, QuantSpec(8, symmetric, "channel"))
    assert float((out - w).abs().max()) <= float(w.abs().max()) / 120
    assert float((out - w).pow(2).mean() / w.pow(2).mean()) < 1e-4


@pytest.mark.parametrize("spec", [QuantSpec(3), QuantSpec(1), QuantSpec(2, False, "channel", "mse")], ids=str)
def test_all_zero_stays_zero(spec: QuantSpec) -> None:
    w = torch.zeros(3, 4)
    w_hat = quantize_weight(w, spec)
    assert torch.equal(w_hat, w)
    w[0] = torch.randn(4)  # one live channel beside dead ones
    assert torch.isfinite(quantize_weight(w, spec)).all()


def test_weight_is_not_modified() -> None:
    w = torch.randn(4, 4)
    before = w.clone()
    quantize_weight(w, QuantSpec(2, range="mse"))
    assert torch.equal(w, before)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 0}, "downstream.weight_bits"),
        ({"bits": 9}, "downstream.weight_bits"),
        ({"bits": 2.0}, "downstream.weight_bits"),
        ({"bits": True}, "downstream.weight_bits"),
        ({"bits": 2, "granularity": "row"}, "downstream.granularity"),
        ({"bits": 2, "range": "percentile"}, "downstream.range"),
        ({"bits": 2, "symmetric": "yes"}, "downstream.symmetric"),
    ],
)
def test_bad_spec_raises_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        QuantSpec(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


# --- activations --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_activation_quantizer(bits: int, signed: bool, observer: str) -> None:
    torch.manual_seed(bits)
    quant = ActivationQuantizer(bits, signed=signed, observer=observer)
    data = [torch.randn(8, 4, 5, 5) for _ in range(3)]
    if not signed:
        data = [torch.relu(x) for x in data]
    assert torch.equal(quant(data[0]), data[0])  # uncalibrated: pass-through
    quant.calibrating = True
    for x in data:
        assert torch.equal(quant(x), x)  # calibrating: pass-through
    quant.calibrating = False
    assert quant.calibrated
    out = quant(data[0])
    assert out.shape == data[0].shape and torch.isfinite(out).all()
    assert _levels(out) <= 2**bits
    if not signed:
        assert float(out.min()) >= 0
    if observer == "minmax":
        lo = min(float(x.min()) for x in data)
        hi = max(float(x.max()) for x in data)
        assert float(quant.min_val) == lo and float(quant.max_val) == hi
    if bits == 8:
        assert float((out - data[0]).abs().max()) < 0.05 * float(data[0].abs().max())


def test_activation_quantizer_unsigned_keeps_zero_and_state() -> None:
    quant = ActivationQuantizer(2, signed=False)
    quant.calibrating = True
    quant(torch.tensor([0.0, 1.0, 3.0]))
    quant.calibrating = False
    # s = 3 / 3 = 1, z = 0: grid {0, 1, 2, 3}; negatives clamp to 0.
    torch.testing.assert_close(quant(torch.tensor([-2.0, 0.0, 0.4, 1.6, 9.0])), torch.tensor([0.0, 0.0, 0.0, 2.0, 3.0]))
    copy = ActivationQuantizer(2, signed=False)
    copy.load_state_dict(quant.state_dict())
    assert copy.calibrated and float(copy.max_val) == 3.0


def test_percentile_ignores_outliers() -> None:
    torch.manual_seed(0)
    x = torch.rand(100_000)
    x[0] = 1000.0
    quant = ActivationQuantizer(4, signed=False, observer="percentile", percentile=99.9)
    quant.calibrating = True
    quant(x)
    assert float(quant.max_val) < 1.01


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 0}, "downstream.act_bits"),
        ({"bits": 4, "observer": "ema"}, "downstream.act_observer"),
        ({"bits": 4, "percentile": 0}, "downstream.act_percentile"),
    ],
)
def test_bad_activation_quantizer(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ActivationQuantizer(**kwargs)
    assert info.value.field == field


# --- BatchNorm folding ----------------------------------------------------------------


def _shape(name: str) -> tuple[int, int]:
    return (3, 32) if name == "resnet18" else (1, 8)


def _model_with_stats(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    channels, size = _shape(name)
    model = create_model(name, num_classes=5, in_channels=channels, input_size=size, width=0.25)
    # Non-trivial affine parameters too, so folding has something to fold.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, channels, size, size) * 2 + 0.5)
    return model.eval(), torch.randn(4, channels, size, size) * 2 + 0.5


def _conv_bn_count(model: nn.Module) -> int:
    return len(conv_bn_pairs(model))


@pytest.mark.parametrize("name", list_models())
def test_fold_batchnorm_matches(name: str) -> None:
    model, x = _model_with_stats(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bns_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert _conv_bn_count(model) > 0
    folded = fold_batchnorm(model)
    assert type(folded) is type(model) and not folded.training
    assert _conv_bn_count(folded) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == bns_before - _conv_bn_count(model)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # Module names survive (the conv names are the same, BNs became Identity).
    names = dict(folded.named_modules())
    for conv_name, bn_name in conv_bn_pairs(model):
        assert isinstance(names[bn_name], nn.Identity)
        assert names[conv_name].bias is not None
    # The original is untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns_before


def test_fold_skips_bn_with_shared_conv_output() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.conv2 = nn.Conv2d(2, 3, 1)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(x))

    model = Branch().eval()
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)  # conv output also used by the add
    assert isinstance(folded.bn2, nn.Identity)
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(folded(x), model(x))


def test_reestimate_bn_recovers_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5), nn.ReLU())
    model.eval()
    model[1].running_mean.fill_(7.0)
    model[1].running_var.fill_(9.0)
    weight_before = model[0].weight.clone()
    data = [torch.randn(6, 2, 5, 5) * 3 + 1 for _ in range(4)]
    used = reestimate_bn(model, iter([(x, None) for x in data]), num_batches=3)
    assert used == 3
    with torch.no_grad():
        features = [model[0](x).transpose(0, 1).reshape(4, -1) for x in data[:3]]
    # Equal-sized batches: the cumulative average of per-batch statistics.
    mean = torch.stack([f.mean(dim=1) for f in features]).mean(dim=0)
    var = torch.stack([f.var(dim=1, unbiased=True) for f in features]).mean(dim=0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.3 and not model.training and not model[1].training
    assert torch.equal(model[0].weight, weight_before)


def test_reestimate_bn_restores_train_mode_and_validates() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    model.train()
    reestimate_bn(model, [torch.randn(3, 1, 2, 2)], num_batches=5)
    assert model.training and model[1].training and model[1].momentum == 0.1
    with pytest.raises(ConfigError) as info:
        reestimate_bn(model, [torch.randn(3, 1, 2, 2)], num_batches=0)
    assert info.value.field == "downstream.bn_batches"

"""PTQ: AdaRound against round-to-nearest, the quantized-layer wrapper, the whole PTQ pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from r2sweep.core.data import create_data, make_loader
from r2sweep.core.models import create_model
from r2sweep.core.quant import ActivationQuantizer, QuantSpec, quantize_weight
from r2sweep.core.quant.adaround import (
    GAMMA,
    ZETA,
    AdaRoundSettings,
    AdaRoundWeight,
    adaround_layer,
    reconstruction_error,
    rectified_sigmoid,
    weight_grid,
)
from r2sweep.core.quant.layers import QuantLayer, bake_weights, input_is_nonnegative, quant_layers, wrap_layers
from r2sweep.core.quant.ptq import capture, post_training_quantize
from r2sweep.core.quant.methods import PTQConfig
from r2sweep.core.train import evaluate


def _heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.1
    w.view(-1)[:3] = torch.tensor([0.9, -0.8, 0.7])  # a few outliers stretch the range
    return w


# --- AdaRound pieces ----------------------------------------------------------------


def test_rectified_sigmoid_reaches_exact_zero_and_one() -> None:
    v = torch.tensor([-20.0, 0.0, 20.0])
    h = rectified_sigmoid(v)
    assert h[0].item() == 0.0 and h[2].item() == 1.0
    assert h[1].item() == pytest.approx(0.5 * (ZETA - GAMMA) + GAMMA)


@pytest.mark.parametrize("spec", [QuantSpec(2), QuantSpec(3, False, "channel", "mse"), QuantSpec(1), QuantSpec(4, True, "channel")])
def test_grid_round_to_nearest_matches_fake_quant(spec: QuantSpec) -> None:
    w = _heavy_tailed(8, 4, 3, 3)
    grid = weight_grid(w, spec)
    assert torch.allclose(grid.round_to_nearest(w), quantize_weight(w, spec), atol=1e-6)


def test_soft_weight_starts_at_the_float_weight_and_hard_lands_on_the_grid() -> None:
    w = _heavy_tailed(16, 8)
    spec = QuantSpec(2)
    grid = weight_grid(w, spec)
    soft = AdaRoundWeight(w, grid)
    # Inside the grid's range the soft weight reproduces W (up to the logit clamp).
    inside = (grid.coords(w) >= grid.qmin) & (grid.coords(w) <= grid.qmax)
    assert torch.allclose(soft.soft()[inside], w[inside], atol=1e-4)
    hard = soft.hard()
    levels = torch.unique(hard)
    assert levels.numel() <= 2**spec.bits
    # Each hard value is floor or floor + 1 of the weight's grid coordinate.
    q = torch.round(grid.coords(hard))
    floor = torch.floor(grid.coords(w)).clamp(grid.qmin, grid.qmax)
    assert bool(((q == floor) | (q == (floor + 1).clamp(max=grid.qmax))).all())


def test_regularizer_is_zero_only_at_hard_decisions() -> None:
    soft = AdaRoundWeight(torch.randn(10), weight_grid(torch.randn(10), QuantSpec(2)))
    with torch.no_grad():
        soft.v.fill_(20.0)
    assert soft.regularizer(2.0).item() == 0.0
    with torch.no_grad():
        soft.v.fill_(0.0)
    assert soft.regularizer(2.0).item() > 0


def test_beta_schedule_warms_up_then_anneals_from_20_to_2() -> None:
    settings = AdaRoundSettings(iterations=100)
    assert settings.beta(0) is None and settings.beta(19) is None
    assert settings.beta(20) == pytest.approx(20.0)
    assert settings.beta(99) == pytest.approx(2.0)
    assert settings.beta(60) < settings.beta(40)


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 16, 3, padding=1), nn.Linear(32, 16)], ids=["conv", "linear"])
@pytest.mark.parametrize("bits", [2, 3])
def test_adaround_reconstructs_the_layer_output_better_than_round_to_nearest(layer: nn.Module, bits: int) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(_heavy_tailed(*layer.weight.shape))
    shape = (128, 8, 6, 6) if isinstance(layer, nn.Conv2d) else (128, 32)
    inputs = torch.relu(torch.randn(shape))
    with torch.no_grad():
        targets = layer(inputs)
    spec = QuantSpec(bits, granularity="channel")

    def error(weight: torch.Tensor) -> float:
        with torch.no_grad():
            original = layer.weight.detach().clone()
            layer.weight.copy_(weight)
            value = reconstruction_error(layer(inputs), targets).item()
            layer.weight.copy_(original)
        return value

    rtn = error(quantize_weight(layer.weight.detach(), spec))
    learned = adaround_layer(layer, inputs, targets, spec, AdaRoundSettings(iterations=300, lr=1e-2))
    assert torch.unique(learned).numel() <= layer.weight.shape[0] * 2**bits
    assert error(learned) < 0.9 * rtn


# --- the wrapper --------------------------------------------------------------------


def test_wrapped_model_with_identity_quantizers_is_unchanged_and_first_last_are_marked() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=8).eval()
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    wrap_layers(model, lambda info: nn.Identity(), lambda info: nn.Identity())
    assert torch.allclose(model(x), expected, atol=1e-6)
    marks = [w.first_or_last for _, w in quant_layers(model)]
    assert marks[0] and marks[-1] and not any(marks[1:-1])


def test_input_signs_follow_relu() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    signs = input_is_nonnegative(model, [torch.randn(8, 1, 8, 8)])
    # The image is signed, the ReLU output is not, the conv output before Linear is.
    assert signs == {"0": False, "2": True, "4": False}


def test_bake_weights_writes_the_quantized_values() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    spec = QuantSpec(2)

    class RoundTo2Bits(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return quantize_weight(w, spec)

    wrap_layers(model, lambda info: RoundTo2Bits(), lambda info: nn.Identity())
    x = torch.randn(3, 8)
    before = model(x)
    bake_weights(model)
    assert torch.allclose(model(x), before)
    for _, wrapper in quant_layers(model):
        assert isinstance(wrapper.weight_quantizer, nn.Identity)
        assert torch.unique(wrapper.layer.weight).numel() <= 4


def test_capture_stops_after_the_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(300, 4)  # three chunks
    assert torch.equal(capture(model, model[1], x, output=True), torch.relu(model[0](x)).detach())
    assert torch.equal(capture(model, model[0], x, output=False), x)


# --- the PTQ pipeline on a pre-trained digits model ---------------------------------


@pytest.fixture(scope="module")
def digits_model():
    from r2sweep.core.config.sections import R2Config, TrainConfig
    from r2sweep.core.train import pretrain

    torch.manual_seed(0)
    data = create_data("digits", seed=0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, width=0.5)
    train = make_loader(data.train, 64, shuffle=True, seed=0)
    val = make_loader(data.val, 256, shuffle=False, seed=0)
    pretrain(model, R2Config().build(model), train, val, TrainConfig(epochs=2), device=torch.device("cpu"))
    calibration = torch.stack([data.train[i][0] for i in range(128)])
    return model.eval(), data, train, val, calibration


def _distinct_per_layer(model: nn.Module) -> list[int]:
    return [torch.unique(w.layer.weight).numel() for _, w in quant_layers(model)]


def test_ptq_rtn_w8a8_matches_float_and_holds_the_grid(digits_model) -> None:
    model, _, _, val, calibration = digits_model
    fp = evaluate(model, val, torch.device("cpu"))
    cfg = PTQConfig(algorithm="rtn", weight_bits=[8], granularity="tensor")
    quantized = post_training_quantize(model, cfg, 8, calibration)
    assert abs(evaluate(quantized, val, torch.device("cpu")) - fp) <= 1.0
    assert all(n <= 256 for n in _distinct_per_layer(quantized))
    acts = [m for m in quantized.modules() if isinstance(m, ActivationQuantizer)]
    assert len(acts) == len(quant_layers(quantized)) and all(a.calibrated and a.bits == 8 for a in acts)
    # The first layer's input is the standardized image (signed); the others follow a ReLU.
    assert acts[0].signed and not any(a.signed for a in acts[1:])
    # BatchNorm was folded away.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quantized.modules())
    assert not model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_ptq_keeps_first_and_last_at_8_bits_unless_told(digits_model) -> None:
    model, _, _, _, calibration = digits_model
    cfg = PTQConfig(algorithm="rtn", weight_bits=[2], act_bits=4, granularity="tensor")
    counts = _distinct_per_layer(post_training_quantize(model, cfg, 2, calibration))
    assert counts[0] > 4 and counts[-1] > 4 and all(n <= 4 for n in counts[1:-1])
    cfg = PTQConfig(algorithm="rtn", weight_bits=[2], keep_first_last_bits=None, granularity="tensor")
    assert all(n <= 4 for n in _distinct_per_layer(post_training_quantize(model, cfg, 2, calibration)))
    acts = [m for m in post_training_quantize(model, PTQConfig(algorithm="rtn", act_bits=4), 2, calibration).modules() if isinstance(m, ActivationQuantizer)]
    assert [a.bits for a in acts] == [8] + [4] * (len(acts) - 2) + [8]


def test_adaround_beats_round_to_nearest_at_2_bits(digits_model) -> None:
    model, _, _, val, calibration = digits_model
    cpu = torch.device("cpu")
    common = dict(weight_bits=[2], granularity="tensor", range="mse", act_bits=8)
    rtn = evaluate(post_training_quantize(model, PTQConfig(algorithm="rtn", **common), 2, calibration), val, cpu)
    ada = evaluate(
        post_training_quantize(model, PTQConfig(algorithm="adaround", adaround_iters=200, **common), 2, calibration), val, cpu
    )
    assert ada > rtn + 5, (rtn, ada)


def test_bn_reestimation_keeps_bn_and_recomputes_its_statistics(digits_model) -> None:
    model, _, train, val, calibration = digits_model
    cfg = PTQConfig(algorithm="rtn", weight_bits=[2], bn_reestimate=True, bn_batches=4, granularity="tensor")
    with pytest.raises(ValueError, match="bn_batches"):
        post_training_quantize(model, cfg, 2, calibration)
    quantized = post_training_quantize(model, cfg, 2, calibration, train)
    norms = [m for m in quantized.modules() if isinstance(m, nn.BatchNorm2d)]
    originals = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(int(n.num_batches_tracked) == 4 for n in norms)
    assert not torch.allclose(norms[1].running_mean, originals[1].running_mean)
    assert evaluate(quantized, val, torch.device("cpu")) > 10  # runs and predicts


def test_unfolded_ptq_keeps_batchnorm_with_its_statistics(digits_model) -> None:
    model, _, _, val, calibration = digits_model
    for algorithm in ("rtn", "adaround"):
        cfg = PTQConfig(
            algorithm=algorithm, weight_bits=[4], bn_fold=False, granularity="tensor", adaround_iters=50
        )
        quantized = post_training_quantize(model, cfg, 4, calibration)
        norms = [m for m in quantized.modules() if isinstance(m, nn.BatchNorm2d)]
        originals = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(norms) == len(originals)
        assert all(torch.equal(a.running_var, b.running_var) for a, b in zip(norms, originals))
        assert all(n <= 16 for n in _distinct_per_layer(quantized)[1:-1])
        assert evaluate(quantized, val, torch.device("cpu")) > 80


def test_adaround_through_an_unfolded_bn_beats_round_to_nearest_after_the_bn() -> None:
    # Unfolded, the error that matters is after BN's per-channel rescaling
    # (gains of 1 to 30 here, as in depthwise layers).
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        conv.weight.copy_(_heavy_tailed(8, 4, 3, 3))
        bn.running_var.copy_(torch.logspace(-3, 0, 8))  # gains from 1 to ~30
    inputs = torch.relu(torch.randn(128, 4, 6, 6))
    with torch.no_grad():
        targets = bn(conv(inputs))
    spec = QuantSpec(3, granularity="channel")
    learned = adaround_layer(conv, inputs, targets, spec, AdaRoundSettings(iterations=300, lr=1e-2), after=bn)

    def error(weight: torch.Tensor) -> float:
        with torch.no_grad():
            return reconstruction_error(bn(conv._conv_forward(inputs, weight, None)), targets).item()

    assert error(learned) < 0.8 * error(quantize_weight(conv.weight.detach(), spec))

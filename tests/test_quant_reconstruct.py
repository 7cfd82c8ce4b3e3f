"""Block reconstruction (BRECQ, QDrop): the blocks it finds, the Fisher weights, and what it learns."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.models.mobilenet import MobileNetV1
from r2sweep.core.quant.blocks import reconstruction_units
from r2sweep.core.quant.fake import ActivationQuantizer
from r2sweep.core.quant.methods import PTQConfig, load_downstream
from r2sweep.core.quant.ptq import post_training_quantize
from r2sweep.core.quant.reconstruct import capture, fisher_weights


class _Residual(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus the input, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class _Net(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = _Residual(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(torch.relu(self.stem(x)))).flatten(1))


def _trained_net(seed: int = 0) -> tuple[_Net, torch.Tensor, torch.Tensor]:
    """A small residual net fitted for a few steps to a learnable rule (trained BN statistics, real outliers)."""
    torch.manual_seed(seed)
    net = _Net()
    x = torch.randn(96, 3, 8, 8)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval(), x, y


def _ptq(net: nn.Module, x: torch.Tensor, y: torch.Tensor, **fields) -> nn.Module:
    fields = {"weight_bits": [2], "adaround_iters": 150, "bn_fold": False, **fields}
    return post_training_quantize(net, PTQConfig(**fields), 2, x, labels=y)


# --- the units -----------------------------------------------------------------------------


def test_blocks_are_found_in_resnet_mobilenet_v2_and_mobilenet_v1() -> None:
    resnet = reconstruction_units(torchvision.models.resnet18(num_classes=10))
    assert [u.name for u in resnet.units] == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                              "layer3.1", "layer4.0", "layer4.1", "fc"]
    assert resnet.units[3].layers == ("layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0")
    assert resnet.note is None
    v2 = reconstruction_units(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5))
    # Every inverted residual (features.1-17), the residual addition inside; the stem, last conv and classifier alone.
    assert [u.name for u in v2.blocks] == [f"features.{i}" for i in range(1, 18)]
    assert [u.name for u in v2.units if not u.is_block] == ["features.0.0", "features.18.0", "classifier.1"]
    v1 = reconstruction_units(MobileNetV1(10, width=0.25))
    assert all(len(u.layers) == 2 and u.layers[0].endswith("depthwise") or True for u in v1.blocks)
    assert [len(u.layers) for u in v1.blocks] == [2] * 13  # the depthwise-pointwise pairs
    assert v1.units[0].name == "features.0.0" and v1.units[-1].name == "classifier"


def test_a_model_without_blocks_falls_back_to_layers_and_says_so() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    units = reconstruction_units(plain)
    assert [u.layers for u in units.units] == [("0",), ("2",), ("4",)] and units.blocks == ()
    assert units.note == "no blocks recognized in Sequential: reconstructing layer by layer"


def test_an_untraceable_model_is_reconstructed_layer_by_layer_in_module_order() -> None:
    class Branchy(_Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                x = -x
            return super().forward(x)

    units = reconstruction_units(Branchy())
    assert [u.name for u in units.units] == ["stem", "block.conv1", "block.conv2", "fc"]
    assert units.note.startswith("model is not torch.fx-traceable")


def test_a_block_whose_layer_is_also_called_elsewhere_is_split() -> None:
    class Shared(_Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.block(torch.relu(self.stem(x)))
            return self.fc(self.pool(self.block.conv2(h)).flatten(1))  # conv2 called a second time

    units = reconstruction_units(Shared())
    assert [u.name for u in units.units] == ["stem", "block.conv1", "block.conv2", "fc"]
    assert "block" in units.note and "shared or interleaved" in units.note


# --- the Fisher weights ----------------------------------------------------------------------


def test_fisher_weights_equal_a_float64_computation_by_hand() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    # d(sum of cross-entropies)/d(first layer's output), by hand: (softmax - onehot) W2, through ReLU.
    z1 = x @ net[0].weight.T + net[0].bias
    logits = torch.relu(z1) @ net[2].weight.T + net[2].bias
    g = (torch.softmax(logits, dim=1) - nn.functional.one_hot(y, 3)) @ net[2].weight * (z1 > 0)
    expected = 1 + g**2 / (g**2).mean()
    assert torch.allclose(fisher_weights(net, net[0], x, y), expected, rtol=0, atol=1e-12)
    # In float32 (how it runs), within float32's rounding.
    single = copy.deepcopy(net).float()
    assert torch.allclose(fisher_weights(single, single[0], x.float(), y), expected.float(), rtol=1e-4, atol=1e-4)
    assert all(p.grad is None and p.requires_grad for p in net.parameters()), "the model's gradients are left alone"


# --- what reconstruction learns ----------------------------------------------------------------


def test_block_reconstruction_error_is_below_layer_wise_adarounds_on_the_same_block() -> None:
    # Both run to convergence (every rounding decided): with fewer iterations what
    # decides is how many weights the regularizer has settled, not the objective.
    net, x, y = _trained_net()
    target = capture(net, net.block, x, output=True)
    errors = {}
    for algorithm in ("adaround", "brecq"):
        quantized = _ptq(net, x, y, algorithm=algorithm, act_bits=32, fisher=False, adaround_iters=1000, adaround_lr=2e-2)
        errors[algorithm] = float((capture(quantized, quantized.block, x, output=True) - target).pow(2).mean())
    assert errors["brecq"] < 0.9 * errors["adaround"], errors


def test_qdrop_with_probability_zero_is_brecq_exactly() -> None:
    net, x, y = _trained_net()
    brecq = _ptq(net, x, y, algorithm="brecq", act_bits=4, adaround_iters=60)
    qdrop = _ptq(net, x, y, algorithm="qdrop", act_bits=4, adaround_iters=60, drop_prob=0.0)
    dropped = _ptq(net, x, y, algorithm="qdrop", act_bits=4, adaround_iters=60, drop_prob=0.5)
    for name, value in brecq.state_dict().items():
        assert torch.equal(value, qdrop.state_dict()[name]), name
    assert any(not torch.equal(v, dropped.state_dict()[k]) for k, v in brecq.state_dict().items())
    # Dropping is for reconstruction only: the result quantizes every element, every time.
    with torch.no_grad():
        assert torch.equal(dropped(x), dropped(x))


def test_activation_steps_are_learned_inside_blocks_and_kept_when_act_lr_is_zero() -> None:
    net, x, y = _trained_net()

    def ranges(model: nn.Module) -> dict[str, float]:
        return {n: float(m.max_val) for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)}

    kept = ranges(_ptq(net, x, y, algorithm="brecq", act_bits=4, adaround_iters=40, act_lr=0.0))
    learned = ranges(_ptq(net, x, y, algorithm="brecq", act_bits=4, adaround_iters=40, act_lr=1e-2))
    assert kept.keys() == learned.keys() and len(kept) == 4
    assert all(kept[n] != learned[n] for n in kept), (kept, learned)
    # act_lr 0: the calibrated range (the largest input each layer saw with float weights).
    stem_input = float(x.abs().max())
    assert kept["stem.input_quantizer"] == pytest.approx(stem_input)


def test_brecq_and_qdrop_are_ptq_algorithms_with_their_own_result_names_and_fields() -> None:
    brecq, qdrop = load_downstream([{"algorithm": "brecq", "weight_bits": 2, "act_bits": 4},
                                    {"algorithm": "qdrop", "weight_bits": 2, "act_bits": 2}])
    assert brecq.result_names() == ["ptq_brecq_w2a4"] and qdrop.result_names() == ["ptq_qdrop_w2a2"]
    assert (brecq.fisher, brecq.act_lr, qdrop.drop_prob) == (True, 4e-5, 0.5)
    assert brecq.reconstruction_settings().drop_prob == 0 and qdrop.reconstruction_settings().drop_prob == 0.5
    assert brecq.unused_fields() == {"downstream.drop_prob": "downstream.algorithm=brecq",
                                     "downstream.bn_batches": "downstream.bn_reestimate=false"}
    assert "downstream.act_lr" in PTQConfig(algorithm="brecq", act_bits=32).unused_fields()
    assert {"downstream.fisher", "downstream.drop_prob"} <= set(PTQConfig(algorithm="adaround").unused_fields())
    with pytest.raises(ConfigError, match=r"downstream\[0\]\.drop_prob=1(\.0)? is not valid: a probability in \[0, 1\)"):
        load_downstream([{"algorithm": "qdrop", "drop_prob": 1}])
    with pytest.raises(ConfigError, match=r"downstream\[0\]\.fisher='yes' is not valid: true or false"):
        load_downstream([{"algorithm": "brecq", "fisher": "yes"}])


def test_a_trial_runs_brecq_and_qdrop_on_a_resnet_and_says_which_block_it_reconstructs() -> None:
    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.trial import run_trial

    fast = {"weight_bits": 2, "act_bits": 4, "adaround_iters": 20, "calib_samples": 64}
    config = load_trial_config({
        "data": {"name": "digits"}, "model": {"name": "resnet18", "width": 0.125},
        "train": {"epochs": 1, "batch_size": 64},
        "downstream": [{"algorithm": "brecq", **fast}, {"algorithm": "qdrop", **fast}]})
    lines: list[str] = []
    final = run_trial(config, progress=lines.append, device=torch.device("cpu"))
    assert 0 <= final["ptq_brecq_w2a4/top1"] <= 100 and 0 <= final["ptq_qdrop_w2a4/top1"] <= 100
    for name in ("ptq_brecq_w2a4", "ptq_qdrop_w2a4"):
        units = [line.strip() for line in lines if line.startswith(f"  {name}: ")]
        assert units[1] == f"{name}: 2/10 layer1.0 (block of 2 layers)" and len(units) == 10, units

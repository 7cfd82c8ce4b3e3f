"""Model zoo: every registered model builds, runs and trains at every stem and size."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.models import create_model, list_models, register_model, resolve_stem
from r2sweep.core.models.registry import MODELS

# (in_channels, input_size): 8x8 one-channel digits and 32x32 RGB CIFAR.
INPUTS = [(1, 8), (3, 32)]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("stem", ["small", "imagenet"])
@pytest.mark.parametrize(("in_channels", "input_size"), INPUTS)
def test_forward_backward(name: str, stem: str, in_channels: int, input_size: int) -> None:
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=7, in_channels=in_channels, input_size=input_size, width=0.5, stem=stem
    )
    # Batch of 2: BatchNorm in train mode needs more than one value per channel.
    x = torch.randn(2, in_channels, input_size, input_size)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 7)


def test_expected_models_registered() -> None:
    assert {"small_cnn", "resnet18", "mobilenet_v1", "mobilenet_v2"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_width_changes_parameter_count(name: str) -> None:
    def count(width: float) -> int:
        model = create_model(name, num_classes=10, in_channels=3, input_size=32, width=width)
        return sum(p.numel() for p in model.parameters())

    assert count(0.5) < count(1.0) < count(1.5)


def test_resnet18_matches_torchvision_state_dict() -> None:
    model = create_model("resnet18", num_classes=1000, in_channels=3, input_size=224, stem="imagenet")
    ours = model.state_dict()
    ref = torchvision.models.resnet18().state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    # ... so torchvision checkpoints load strictly.
    model = create_model("resnet18", num_classes=1000, stem="auto", input_size=224)
    model.load_state_dict(ref, strict=True)


def test_resnet18_stems() -> None:
    small = create_model("resnet18", num_classes=10, input_size=32)  # auto -> small
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    big = create_model("resnet18", num_classes=10, input_size=224)  # auto -> imagenet
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    one_channel = create_model("resnet18", num_classes=10, in_channels=1, input_size=8)
    assert one_channel.conv1.in_channels == 1


def test_resnet18_width_scales_stages() -> None:
    model = create_model("resnet18", num_classes=10, width=0.5)
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [32, 64, 128, 256]


def test_mobilenet_v1_has_depthwise_convs() -> None:
    model = create_model("mobilenet_v1", num_classes=10, input_size=32)
    depthwise = [
        m for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    ]
    assert len(depthwise) == 13
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [m.stride[0] for m in depthwise].count(2) == 4
    assert model.classifier.in_features == 1024
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize(("stem", "stride"), [("small", 1), ("imagenet", 2)])
def test_mobilenet_v2_stem_and_channels(stem: str, stride: int) -> None:
    model = create_model("mobilenet_v2", num_classes=10, in_channels=1, input_size=8, stem=stem)
    first = model.features[0][0]
    assert first.in_channels == 1 and first.stride == (stride, stride)


def test_resolve_stem() -> None:
    assert resolve_stem("auto", 8) == "small"
    assert resolve_stem("auto", 64) == "small"
    assert resolve_stem("auto", 65) == "imagenet"
    assert resolve_stem("imagenet", 8) == "imagenet"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 0.0}, "model.width"),
        ({"width": -1.0}, "model.width"),
        ({"width": float("nan")}, "model.width"),
        ({"width": "wide"}, "model.width"),
        ({"stem": "cifar"}, "model.stem"),
        ({"num_classes": 1}, "model.num_classes"),
        ({"num_classes": 10.0}, "model.num_classes"),
        ({"in_channels": 0}, "model.in_channels"),
        ({"input_size": 2}, "model.input_size"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, field: str) -> None:
    args = {"num_classes": 10} | kwargs
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        create_model("small_cnn", **args)
    assert info.value.field == field


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ConfigError, match="model.name") as info:
        create_model("vgg16", num_classes=10)
    assert "resnet18" in str(info.value)


def test_register_model_extends_create_model() -> None:
    # The factory contract: the provided values it names, then its own options (checked by name).
    @register_model("_test_linear")
    def build(*, num_classes: int, in_channels: int, input_size: int, hidden: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2, hidden), nn.Linear(hidden, num_classes))

    try:
        assert "_test_linear" in list_models()
        model = create_model("_test_linear", num_classes=3, in_channels=1, input_size=8, hidden=5)
        assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 3)
        assert model[1].out_features == 5
        with pytest.raises(ConfigError, match="model.hiden") as info:
            create_model("_test_linear", num_classes=3, in_channels=1, input_size=8, hiden=5)
        assert "did you mean 'hidden'" in str(info.value)
    finally:
        MODELS.unregister("_test_linear")  # keep the registry as other tests expect it

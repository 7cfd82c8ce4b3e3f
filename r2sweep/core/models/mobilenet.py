"""``mobilenet_v1`` (written here; torchvision has none) and ``mobilenet_v2`` (torchvision's).

Depthwise convolutions are the hard case for 1-2-bit quantization, which is
why both MobileNets are in the zoo.
"""

from __future__ import annotations

import torch
from torch import nn

from r2sweep.core.models.registry import init_conv_bn_, register_builtin, scale_channels

__all__ = ["DepthwiseSeparable", "MobileNetV1", "build_mobilenet_v1", "build_mobilenet_v2"]

# (output channels, stride) of the 13 depthwise-separable blocks (Howard et al. 2017, Table 1).
_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
_V1_STEM_CHANNELS = 32


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU followed by pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=stride, padding=1,
            groups=in_channels, bias=False,
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.depthwise(x)))
        return self.relu2(self.bn2(self.pointwise(x)))


class MobileNetV1(nn.Module):
    """MobileNet-v1: conv stem, 13 depthwise-separable blocks, global average pool, Linear.

    Args:
        num_classes: output logits.
        in_channels: input image channels.
        width: the paper's width multiplier alpha; channels are rounded to multiples of 8 (>= 8).
        stem: ``"imagenet"`` makes the stem conv stride 2 (total stride 32),
            ``"small"`` stride 1 (total stride 16).
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: float = 1.0, stem: str = "imagenet"
    ) -> None:
        super().__init__()
        cin = scale_channels(_V1_STEM_CHANNELS, width)
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, cin, kernel_size=3, stride=2 if stem == "imagenet" else 1,
                          padding=1, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU(inplace=True),
            )
        ]
        for channels, stride in _V1_BLOCKS:
            cout = scale_channels(channels, width)
            layers.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # No dropout: the paper's v1 classifier has none, and it would add
        # noise to the loss landscape a sweep is trying to compare.
        self.classifier = nn.Linear(cin, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


@register_builtin("mobilenet_v1")
def build_mobilenet_v1(
    *, num_classes: int, in_channels: int, input_size: int, width: float, stem: str
) -> nn.Module:
    """Registry builder for :class:`MobileNetV1`."""
    return MobileNetV1(num_classes, in_channels=in_channels, width=width, stem=stem)


@register_builtin("mobilenet_v2")
def build_mobilenet_v2(
    *, num_classes: int, in_channels: int, input_size: int, width: float, stem: str
) -> nn.Module:
    """torchvision's MobileNet-v2, with its first conv adapted to ``in_channels`` and ``stem``.

    The small stem only sets the first conv's stride to 1 (total stride 16), so
    the module names stay torchvision's.
    """
    # Imported here: torchvision's import pulls in torch._dynamo (seconds), which a
    # process that never builds this model should not pay.
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(num_classes=num_classes, width_mult=width)
    first: nn.Conv2d = model.features[0][0]
    if in_channels != first.in_channels:
        replacement = nn.Conv2d(
            in_channels, first.out_channels, kernel_size=first.kernel_size,
            stride=first.stride, padding=first.padding, bias=False,
        )
        # Same init torchvision gives its convs.
        nn.init.kaiming_normal_(replacement.weight, mode="fan_out")
        model.features[0][0] = replacement
        first = replacement
    if stem == "small":
        first.stride = (1, 1)
    return model

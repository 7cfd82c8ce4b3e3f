"""``small_cnn``: a few conv-BN-ReLU blocks, the fast default model of tests and smoke runs."""

from __future__ import annotations

import torch
from torch import nn

from r2sweep.core.models.registry import init_conv_bn_, register_builtin, scale_channels

__all__ = ["SmallCNN", "build_small_cnn"]

_BASE_CHANNELS = (32, 64, 128)
# Stop halving once the map is this small: pooling 4x4 -> 2x2 would throw away
# most of what the last block could still see on 8x8 digits.
_MIN_FEATURE_SIZE = 4


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, max-pool between them while the map is large, GAP, Linear.

    Args:
        num_classes: output logits.
        in_channels: input image channels.
        input_size: input side in pixels; decides how many max-pools are inserted.
        width: multiplier of the 32/64/128 channels (rounded to multiples of 8, >= 8).
        stem: ``"small"`` keeps full resolution in the first block; ``"imagenet"``
            makes the first conv stride 2 and follows it with a stride-2 max-pool,
            so large images are cheap.
    """

    def __init__(
        self, num_classes: int, in_channels: int, input_size: int, width: float, stem: str
    ) -> None:
        super().__init__()
        channels = [scale_channels(c, width) for c in _BASE_CHANNELS]
        layers: list[nn.Module] = []
        size = input_size
        if stem == "imagenet":
            layers += [
                _conv_bn_relu(in_channels, channels[0], stride=2),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ]
            size = (size + 1) // 2
            size = (size + 1) // 2
        else:
            layers.append(_conv_bn_relu(in_channels, channels[0]))
        for cin, cout in zip(channels[:-1], channels[1:]):
            if size // 2 >= _MIN_FEATURE_SIZE:
                layers.append(nn.MaxPool2d(kernel_size=2))
                size //= 2
            layers.append(_conv_bn_relu(cin, cout))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.fc(torch.flatten(x, 1))


@register_builtin("small_cnn")
def build_small_cnn(
    *, num_classes: int, in_channels: int, input_size: int, width: float, stem: str
) -> nn.Module:
    """Registry builder for :class:`SmallCNN`."""
    return SmallCNN(num_classes, in_channels, input_size, width, stem)

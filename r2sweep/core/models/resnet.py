"""``resnet18`` with torchvision's exact module names, plus a width multiplier and a CIFAR stem.

Keeping torchvision's names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``fc`` ...) means
pretrained torchvision checkpoints load into the width-1.0 ImageNet-stem model
unchanged, and per-layer quantization settings can be written with the names
people already know.
"""

from __future__ import annotations

import torch
from torch import nn

from r2sweep.core.models.registry import init_conv_bn_, register_builtin, scale_channels

__all__ = ["ResNet", "build_resnet18"]

_STAGE_CHANNELS = (64, 128, 256, 512)


class ResNet(nn.Module):
    """A BasicBlock ResNet laid out like ``torchvision.models.ResNet``.

    Args:
        layers: blocks per stage, ``[2, 2, 2, 2]`` for ResNet-18.
        num_classes: output logits.
        in_channels: input image channels.
        width: multiplier of the 64/128/256/512 stage channels.
        stem: ``"imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max-pool;
            ``"small"``: 3x3 stride-1 conv and ``maxpool = nn.Identity()``
            (the usual CIFAR ResNet stem).
    """

    def __init__(
        self,
        layers: list[int],
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        planes = [scale_channels(c, width) for c in _STAGE_CHANNELS]
        self.inplanes = planes[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(planes[0], layers[0])
        self.layer2 = self._make_layer(planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)  # the last stage's output channels

        # torchvision's initialisation, so width-1.0 models start where torchvision's do.
        init_conv_bn_(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        # Imported here: torchvision's import pulls in torch._dynamo (seconds), which a
        # process that never builds a ResNet should not pay.
        from torchvision.models.resnet import BasicBlock, conv1x1

        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_builtin("resnet18")
def build_resnet18(
    *, num_classes: int, in_channels: int, input_size: int, width: float, stem: str
) -> nn.Module:
    """Registry builder for ResNet-18 (``input_size`` only matters through ``stem``)."""
    return ResNet([2, 2, 2, 2], num_classes, in_channels=in_channels, width=width, stem=stem)

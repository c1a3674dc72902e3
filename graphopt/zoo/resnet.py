"""ResNet-18 and ResNet-50 (torchvision layout, v1.5 bottleneck)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from graphopt.zoo.common import init_weights, scale_

if TYPE_CHECKING:
    from graphopt.zoo.rep_resnet import RepBasicBlock


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU, conv3x3-BN, plus (downsampled) identity, ReLU."""

    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand x4, plus identity, ReLU."""

    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-equivalent ResNet (stem 7x7/2 + maxpool, four stages, avgpool, fc)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck | RepBasicBlock],
        layers: list[int],
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self._make_stem()
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_stem(self) -> None:
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck | RepBasicBlock],
        planes: int,
        blocks: int,
        stride: int,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self._stem_forward(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int]) -> ResNet:
    model = ResNet(block, layers)
    init_weights(model)
    # Residual sums double the activation variance per block when BN does not normalise;
    # scale both addends by 1/sqrt(2) so the magnitude stays roughly constant with depth.
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            scale_(m.conv3 if isinstance(m, Bottleneck) else m.conv2, 1 / math.sqrt(2))
            if m.downsample is not None:
                scale_(m.downsample[0], 1 / math.sqrt(2))
    return model


def resnet18() -> nn.Module:
    """ResNet-18: BasicBlock x [2, 2, 2, 2], 1000 classes (11.7M parameters)."""
    return _resnet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> nn.Module:
    """ResNet-50 (v1.5): Bottleneck x [3, 4, 6, 3], 1000 classes (25.6M parameters)."""
    return _resnet(Bottleneck, [3, 4, 6, 3])

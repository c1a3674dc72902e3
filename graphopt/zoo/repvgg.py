"""RepVGG (train-time, multi-branch)."""

from __future__ import annotations

import torch
from torch import nn

from graphopt.zoo.common import StagedNet, branch_scale, conv_bn, init_weights, scale_


class RepVGGBlock(nn.Module):
    """RepVGG training block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN) summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)


class RepVGG(StagedNet):
    """RepVGG (train-time form): stage0 + four stages of RepVGG blocks, GAP, linear."""

    def __init__(self, num_blocks: list[int], width: list[float], num_classes: int = 1000) -> None:
        super().__init__(num_blocks, width, num_classes)

    def _stem(self, planes: int) -> nn.Module:
        return RepVGGBlock(3, planes, 2)

    def _blocks(self, cin: int, planes: int, stride: int) -> list[nn.Module]:
        return [RepVGGBlock(cin, planes, stride)]


def repvgg_a0() -> nn.Module:
    """RepVGG-A0, train-time 3-branch blocks, layers [2, 4, 14, 1], width [0.75]*3 + [2.5]."""
    model = RepVGG([2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5])
    init_weights(model)
    for m in model.modules():
        if isinstance(m, RepVGGBlock):
            factor = branch_scale(2, m.rbr_identity is not None)
            scale_(m.rbr_dense.conv, factor)
            scale_(m.rbr_1x1.conv, factor)
    return model

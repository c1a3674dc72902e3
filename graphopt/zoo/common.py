"""What the zoo's model families share: random BatchNorm statistics, conv-BN, initialisation,
the scaling that keeps random multi-branch networks in a modest range, and the staged skeleton of
RepVGG and MobileOne."""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize_bn_stats_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm in ``module`` random statistics and affine parameters, in place.

    running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2.0), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2).
    Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn_(m, generator)
    return module


def randomize_bn_(bn: nn.Module, generator: torch.Generator | None = None) -> None:
    """One BatchNorm's random statistics and affine parameters (those it has), in place, drawn
    as :func:`randomize_bn_stats_` says: never the identity BatchNorm."""
    n = bn.num_features
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
        if bn.running_var is not None:
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
        if bn.weight is not None:
            bn.weight.copy_(0.5 + torch.rand(n, generator=generator))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same'-style padding k//2) followed by BatchNorm, as ``conv`` / ``bn``."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, per group) convolutions, small normal Linear weights, zero biases.

    The fan is counted per group (out_channels / groups * k * k), so a depthwise convolution
    keeps the magnitude of its input instead of shrinking it by the channel count.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def branch_scale(n_conv: int, identity: bool) -> float:
    """Scale for each of ``n_conv`` summed Kaiming-initialised conv branches.

    Without an identity branch the sum keeps the input's variance. With one, the convolutions
    together carry 1/8 of it: identity + noise through a ReLU otherwise grows ~1.3x per block
    (the ReLU clips less than half of a positively biased sum), which compounds over the 20+
    identity blocks of RepVGG / MobileOne; even so magnitudes drift up slowly with depth.
    """
    return 1 / math.sqrt(n_conv * (8 if identity else 1))


def scale_(conv: nn.Conv2d, factor: float) -> None:
    with torch.no_grad():
        conv.weight.mul_(factor)


class StagedNet(nn.Module):
    """The RepVGG / MobileOne skeleton: a stride-2 stem block, four stages whose first block has
    stride 2, global average pooling, a linear classifier. Subclasses build the blocks."""

    def __init__(self, num_blocks: list[int], width: list[float], num_classes: int) -> None:
        super().__init__()
        self.in_planes = min(64, int(64 * width[0]))
        self.stage0 = self._stem(self.in_planes)
        self.stage1 = self._make_stage(int(64 * width[0]), num_blocks[0])
        self.stage2 = self._make_stage(int(128 * width[1]), num_blocks[1])
        self.stage3 = self._make_stage(int(256 * width[2]), num_blocks[2])
        self.stage4 = self._make_stage(int(512 * width[3]), num_blocks[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(int(512 * width[3]), num_classes)

    def _stem(self, planes: int) -> nn.Module:
        raise NotImplementedError

    def _blocks(self, cin: int, planes: int, stride: int) -> list[nn.Module]:
        raise NotImplementedError

    def _make_stage(self, planes: int, num_blocks: int) -> nn.Sequential:
        blocks: list[nn.Module] = []
        for stride in [2] + [1] * (num_blocks - 1):
            blocks += self._blocks(self.in_planes, planes, stride)
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.linear(torch.flatten(self.gap(x), 1))

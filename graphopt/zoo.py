"""Built-in models for tests, examples and benchmarks; nothing is downloaded.

    >>> from graphopt import zoo
    >>> zoo.names()  # doctest: +NORMALIZE_WHITESPACE
    ['acnet_resnet18', 'dbb_resnet18', 'digits_cnn', 'fastvit_t', 'mobilenetv2',
     'mobileone_s0', 'repvgg_a0', 'resnet18', 'resnet50', 'sesr_m5', 'vit_s']
    >>> m = zoo.get("resnet18")
    >>> y = m.model(*m.example_inputs)

Every model is written in plain torch (no torchvision), is FX-traceable with
``torch.fx.symbolic_trace`` and exports to ONNX with a dynamic batch dimension. The example
input is one 1x3x224x224 image and the task "classification", except for ``digits_cnn`` (one
1x1x8x8 digit) and ``sesr_m5`` (a 1x1x128x128 luma image, "super-resolution", output
1x1x256x256).

Six are the *train-time* form of a structurally re-parameterisable network: multi-branch
blocks that collapse into one convolution each at inference (``repvgg_a0``, ``mobileone_s0``,
``dbb_resnet18``, ``acnet_resnet18``, ``fastvit_t``; ``sesr_m5``'s expanded linear blocks).

All models except ``digits_cnn`` have random weights. Their BatchNorm layers get random running
statistics and affine parameters (:func:`randomize_bn_stats_`), so folding a BatchNorm into a
convolution is never a no-op. Convolutions are Kaiming-initialised; where several branches or a
residual path are summed, the branch convolutions are scaled down so that activations stay in a
modest range in eval mode (a random net whose BN does not normalise would otherwise grow by the
number of branches at every block): outputs are O(1-30), intermediates below a few hundred.

``digits_cnn`` is a small CNN trained in a few seconds on scikit-learn's bundled 8x8 digits, so
it has real BatchNorm statistics and a meaningful accuracy (:func:`digits_data`).

:func:`get` leaves torch's global random state as it found it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from graphopt._util import cache_dir, close_matches
from graphopt.errors import GraphoptError

__all__ = ["ZooModel", "digits_data", "get", "names", "randomize_bn_stats_"]


@dataclass(frozen=True)
class ZooModel:
    """A model of the zoo: an eval-mode module, inputs to run it on, and what it is."""

    name: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    description: str
    task: str


# --------------------------------------------------------------------------------------------
# helpers


def randomize_bn_stats_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm in ``module`` random statistics and affine parameters, in place.

    running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2.0), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2).
    Returns ``module``.
    """
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            if m.running_var is not None:
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
            if m.bias is not None:
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return module


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same'-style padding k//2) followed by BatchNorm, as ``conv`` / ``bn``."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def _init_weights(model: nn.Module) -> None:
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


def _branch_scale(n_conv: int, identity: bool) -> float:
    """Scale for each of ``n_conv`` summed Kaiming-initialised conv branches.

    Without an identity branch the sum keeps the input's variance. With one, the convolutions
    together carry 1/8 of it: identity + noise through a ReLU otherwise grows ~1.3x per block
    (the ReLU clips less than half of a positively biased sum), which compounds over the 20+
    identity blocks of RepVGG / MobileOne; even so magnitudes drift up slowly with depth.
    """
    return 1 / math.sqrt(n_conv * (8 if identity else 1))


def _scale_(conv: nn.Conv2d, factor: float) -> None:
    with torch.no_grad():
        conv.weight.mul_(factor)


# --------------------------------------------------------------------------------------------
# ResNet


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
    _init_weights(model)
    # Residual sums double the activation variance per block when BN does not normalise;
    # scale both addends by 1/sqrt(2) so the magnitude stays roughly constant with depth.
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            _scale_(m.conv3 if isinstance(m, Bottleneck) else m.conv2, 1 / math.sqrt(2))
            if m.downsample is not None:
                _scale_(m.downsample[0], 1 / math.sqrt(2))
    return model


def _resnet18() -> nn.Module:
    """ResNet-18: BasicBlock x [2, 2, 2, 2], 1000 classes (11.7M parameters)."""
    return _resnet(BasicBlock, [2, 2, 2, 2])


def _resnet50() -> nn.Module:
    """ResNet-50 (v1.5): Bottleneck x [3, 4, 6, 3], 1000 classes (25.6M parameters)."""
    return _resnet(Bottleneck, [3, 4, 6, 3])


# --------------------------------------------------------------------------------------------
# MobileNetV2


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-ReLU6, 3x3 depthwise-ReLU6, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0 (torchvision layout: ``features`` + ``classifier``)."""

    # expand ratio t, channels c, repeats n, first stride s
    CONFIG = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        cin = 32
        features: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _mobilenetv2() -> nn.Module:
    """MobileNetV2 (width 1.0): inverted residuals, ReLU6, linear bottlenecks, 1000 classes."""
    model = MobileNetV2()
    _init_weights(model)
    for m in model.modules():
        if isinstance(m, InvertedResidual) and m.use_res_connect:
            _scale_(m.conv[-2], 1 / math.sqrt(2))  # the linear projection feeding the sum
    return model


# --------------------------------------------------------------------------------------------
# RepVGG (train-time, multi-branch)


class RepVGGBlock(nn.Module):
    """RepVGG training block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN) summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = _conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)


class _StagedNet(nn.Module):
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


class RepVGG(_StagedNet):
    """RepVGG (train-time form): stage0 + four stages of RepVGG blocks, GAP, linear."""

    def __init__(self, num_blocks: list[int], width: list[float], num_classes: int = 1000) -> None:
        super().__init__(num_blocks, width, num_classes)

    def _stem(self, planes: int) -> nn.Module:
        return RepVGGBlock(3, planes, 2)

    def _blocks(self, cin: int, planes: int, stride: int) -> list[nn.Module]:
        return [RepVGGBlock(cin, planes, stride)]


def _repvgg_a0() -> nn.Module:
    """RepVGG-A0, train-time 3-branch blocks, layers [2, 4, 14, 1], width [0.75]*3 + [2.5]."""
    model = RepVGG([2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5])
    _init_weights(model)
    for m in model.modules():
        if isinstance(m, RepVGGBlock):
            factor = _branch_scale(2, m.rbr_identity is not None)
            _scale_(m.rbr_dense.conv, factor)
            _scale_(m.rbr_1x1.conv, factor)
    return model


# --------------------------------------------------------------------------------------------
# MobileOne (train-time, over-parameterised)


class MobileOneBlock(nn.Module):
    """MobileOne training block: ``num_conv_branches`` kxk conv-BN branches, a 1x1 'scale'
    conv-BN branch (when k > 1 and ``use_scale_branch``) and an identity BN branch (when shapes
    allow), summed, then ``activation`` (a module class; None: no activation).

    FastViT's variant (apple/ml-fastvit ``models/modules/mobileone.py``) is the same block with
    GELU, or with no activation; its RepMixer ``norm`` keeps only the identity BN
    (``num_conv_branches=0, use_scale_branch=False``).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
        *,
        activation: type[nn.Module] | None = nn.ReLU,
        use_scale_branch: bool = True,
    ) -> None:
        super().__init__()
        self.num_conv_branches = num_conv_branches
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            _conv_bn(cin, cout, k, stride, groups) for _ in range(num_conv_branches)
        )
        use_scale = k > 1 and use_scale_branch
        self.rbr_scale = _conv_bn(cin, cout, 1, stride, groups) if use_scale else None
        if not num_conv_branches and self.rbr_scale is None and self.rbr_skip is None:
            raise GraphoptError("MobileOneBlock: no branch left; give it a conv branch.")
        self.activation = activation() if activation is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in [*self.rbr_conv, self.rbr_scale, self.rbr_skip]:
            if branch is not None:
                out = branch(x) if out is None else out + branch(x)
        return out if self.activation is None else self.activation(out)


class MobileOne(_StagedNet):
    """MobileOne (train-time form, apple/ml-mobileone layout): stage0, four stages of
    (depthwise 3x3 block, pointwise 1x1 block) pairs, GAP, linear."""

    def __init__(
        self,
        num_blocks: list[int],
        width: list[float],
        num_conv_branches: int,
        num_classes: int = 1000,
    ) -> None:
        self.num_conv_branches = num_conv_branches
        super().__init__(num_blocks, width, num_classes)

    def _stem(self, planes: int) -> nn.Module:
        return MobileOneBlock(3, planes, 3, 2)  # one branch, as upstream

    def _blocks(self, cin: int, planes: int, stride: int) -> list[nn.Module]:
        n = self.num_conv_branches
        return [
            MobileOneBlock(cin, cin, 3, stride, groups=cin, num_conv_branches=n),
            MobileOneBlock(cin, planes, 1, 1, num_conv_branches=n),
        ]


def _mobileone_s0() -> nn.Module:
    """MobileOne-S0, train-time: 4 conv branches per block, blocks [2, 8, 10, 1],
    width (0.75, 1.0, 1.0, 2.0), no squeeze-excitation."""
    model = MobileOne([2, 8, 10, 1], [0.75, 1.0, 1.0, 2.0], num_conv_branches=4)
    _init_weights(model)
    for m in model.modules():
        if isinstance(m, MobileOneBlock):
            convs = [b.conv for b in [*m.rbr_conv, m.rbr_scale] if b is not None]
            for conv in convs:
                _scale_(conv, _branch_scale(len(convs), m.rbr_skip is not None))
    return model


# --------------------------------------------------------------------------------------------
# ResNet-18 with re-parameterisable conv-BN blocks: DiverseBranchBlock, ACNet (train-time)


class IdentityBasedConv1x1(nn.Module):
    """DBB's 1x1 convolution (no bias) whose kernel is a learned weight plus the identity.

    The identity is a buffer (1 at ``[c, c mod (C/groups)]``), so the graph holds
    ``conv2d(x, weight + id_tensor)``. Upstream initialises the weight to 0; here it is small
    and random, so that it matters when the branch is merged.
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        input_dim = channels // groups
        self.weight = nn.Parameter(torch.randn(channels, input_dim, 1, 1) * 0.5 / input_dim**0.5)
        id_value = torch.zeros(channels, input_dim, 1, 1)
        id_value[torch.arange(channels), torch.arange(channels) % input_dim] = 1.0
        self.register_buffer("id_tensor", id_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.id_tensor, None, 1, 0, 1, self.groups)


class BNAndPad(nn.Module):
    """BatchNorm, then a border of ``pad`` pixels that hold the BN's output for a zero input.

    DBB's ``BNAndPadLayer``: padding with ``v = beta - mean * gamma / sqrt(var + eps)`` rather
    than 0 makes the following unpadded kxk conv (or avg-pool) see exactly what a padded conv on
    the BN's *input* would, which is what lets the branch collapse into one conv. Written as
    ``pad(y - v) + v`` instead of upstream's in-place writes to the four borders, so it traces
    with FX and exports to ONNX; the border values are the same, the interior equals ``y`` up to
    float rounding.
    """

    def __init__(self, num_features: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.pad == 0:
            return y
        bn = self.bn
        v = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        v = v.view(1, -1, 1, 1)
        return F.pad(y - v, [self.pad] * 4) + v


class DiverseBranchBlock(nn.Module):
    """DiverseBranchBlock (DingXiaoH/DiverseBranchBlock ``diversebranchblock.py``, train-time):
    a kxk conv-BN's replacement, the sum of (no activation):

    - ``dbb_origin``: kxk conv-BN, stride s, padding k//2;
    - ``dbb_1x1``: 1x1 conv-BN, stride s (only when groups < out_channels);
    - ``dbb_avg``: 1x1 conv -> BNAndPad(k//2) -> AvgPool(k, s) -> BN; for depthwise
      (groups == out_channels) AvgPool(k, s, padding k//2) -> BN on the input itself;
    - ``dbb_1x1_kxk``: 1x1 conv (IdentityBasedConv1x1 when the internal width is in_channels:
      the default, or 2 * in_channels for depthwise) -> BNAndPad(k//2) -> kxk conv (stride s,
      padding 0) -> BN.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        internal_channels_1x1_kxk: int | None = None,
    ) -> None:
        super().__init__()
        p = k // 2
        self.dbb_origin = _conv_bn(cin, cout, k, stride, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(cout, p))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = _conv_bn(cin, cout, 1, stride, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, p))
            self.dbb_1x1 = None
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = internal_channels_1x1_kxk or (cin if groups < cout else 2 * cin)
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            conv1 = nn.Conv2d(cin, internal, 1, groups=groups, bias=False)
            self.dbb_1x1_kxk.add_module("conv1", conv1)
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(internal, p))
        conv2 = nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False)
        self.dbb_1x1_kxk.add_module("conv2", conv2)
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def branch_convs(self) -> list[nn.Conv2d]:
        """The last convolution of each branch (the one that sets the branch's magnitude)."""
        convs = [self.dbb_origin.conv, self.dbb_1x1_kxk.conv2]
        if self.dbb_1x1 is not None:
            convs += [self.dbb_1x1.conv, self.dbb_avg.conv]
        return convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x)
        if self.dbb_1x1 is not None:
            out = out + self.dbb_1x1(x)
        out = out + self.dbb_avg(x)
        return out + self.dbb_1x1_kxk(x)


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block (DingXiaoH/ACNet ``acnet/acb.py``, train-time): a
    kxk conv-BN's replacement, kxk conv-BN + 1xk conv-BN + kx1 conv-BN, same stride, summed.

    Padding p = k//2 for the square conv; the 1xk gets (p - k//2, p) and the kx1 gets
    (p, p - k//2), so all three windows share a centre.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        p = k // 2
        self.square_conv = nn.Conv2d(cin, cout, k, stride, p, groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        self.ver_conv = nn.Conv2d(
            cin, cout, (k, 1), stride, (p, p - k // 2), groups=groups, bias=False
        )
        self.ver_bn = nn.BatchNorm2d(cout)
        self.hor_conv = nn.Conv2d(
            cin, cout, (1, k), stride, (p - k // 2, p), groups=groups, bias=False
        )
        self.hor_bn = nn.BatchNorm2d(cout)

    def branch_convs(self) -> list[nn.Conv2d]:
        return [self.square_conv, self.ver_conv, self.hor_conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = self.square_bn(self.square_conv(x))
        vertical = self.ver_bn(self.ver_conv(x))
        horizontal = self.hor_bn(self.hor_conv(x))
        return square + vertical + horizontal


_RepConvBN = DiverseBranchBlock | ACBlock


class RepBasicBlock(nn.Module):
    """ResNet basic block whose two conv3x3-BN are re-parameterisable blocks (``conv1``,
    ``conv2``): block-ReLU, block, plus (downsampled) identity, ReLU. Subclasses pick the block.
    """

    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = self.conv_bn(cin, planes, 3, stride)
        self.conv2 = self.conv_bn(planes, planes, 3, 1)
        self.relu = nn.ReLU()
        self.downsample = downsample

    @staticmethod
    def conv_bn(cin: int, cout: int, k: int, stride: int) -> _RepConvBN:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        return self.relu(self.conv2(out) + identity)


class DBBBasicBlock(RepBasicBlock):
    """ResNet basic block with DiverseBranchBlocks for its conv3x3-BN."""

    conv_bn = staticmethod(DiverseBranchBlock)


class ACBBasicBlock(RepBasicBlock):
    """ResNet basic block with ACNet ACBlocks for its conv3x3-BN."""

    conv_bn = staticmethod(ACBlock)


class DBBResNet(ResNet):
    """ResNet whose 7x7 stem conv-BN is a DiverseBranchBlock too (as in the DBB repository)."""

    def _make_stem(self) -> None:
        self.stem = DiverseBranchBlock(3, 64, 7, 2)

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def _rep_resnet18(net: type[ResNet], block: type[RepBasicBlock]) -> ResNet:
    model = net(block, [2, 2, 2, 2])
    _init_weights(model)
    # As _resnet: the residual branch is scaled by 1/sqrt(2); on top, each of the n summed
    # branches of a re-parameterisable block by 1/sqrt(n) (the stem's too).
    for m in model.modules():
        if isinstance(m, RepBasicBlock):
            for conv in m.conv2.branch_convs():
                _scale_(conv, 1 / math.sqrt(2))
            if m.downsample is not None:
                _scale_(m.downsample[0], 1 / math.sqrt(2))
    for m in model.modules():
        if isinstance(m, (DiverseBranchBlock, ACBlock)):
            convs = m.branch_convs()
            for conv in convs:
                _scale_(conv, _branch_scale(len(convs), False))
    return model


def _dbb_resnet18() -> nn.Module:
    """ResNet-18, train-time DiverseBranchBlocks (4 branches) for the 7x7 stem and each 3x3."""
    return _rep_resnet18(DBBResNet, DBBBasicBlock)


def _acnet_resnet18() -> nn.Module:
    """ResNet-18, train-time ACNet: each block's 3x3 conv-BN is 3x3 + 1x3 + 3x1 conv-BN."""
    return _rep_resnet18(ResNet, ACBBasicBlock)


# --------------------------------------------------------------------------------------------
# FastViT (train-time, RepMixer stages only)


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet-style large kernel (apple/ml-fastvit ``models/modules/replknet.py``): a kxk
    conv-BN (``lkb_origin``) plus a small-kernel conv-BN (``small_conv``, padding small//2), same
    stride and groups, summed, then GELU.

    Upstream computes ``self.activation(out)`` but returns ``out``, so its GELU is a no-op; timm's
    port applies it, and so does this one.
    """

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, groups: int, small_kernel: int
    ) -> None:
        super().__init__()
        self.lkb_origin = _conv_bn(cin, cout, k, stride, groups)
        self.small_conv = _conv_bn(cin, cout, small_kernel, stride, groups)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.lkb_origin(x) + self.small_conv(x))


class PatchEmbed(nn.Module):
    """FastViT downsampling between stages: ReparamLargeKernelConv(7x7 + 3x3, stride 2,
    groups = in channels, so each input channel makes out/in output channels), then a 1x1
    MobileOneBlock (conv + identity BN, GELU)."""

    def __init__(self, cin: int, cout: int, patch_size: int = 7, stride: int = 2) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(cin, cout, patch_size, stride, groups=cin, small_kernel=3),
            MobileOneBlock(cout, cout, 1, activation=nn.GELU),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RepMixer(nn.Module):
    """FastViT token mixer: ``x + layer_scale * (mixer(x) - norm(x))``.

    ``mixer``: depthwise kxk MobileOneBlock (conv-BN + 1x1 scale conv-BN + identity BN, no
    activation); ``norm``: only an identity BN. At inference it is one depthwise kxk conv.
    """

    def __init__(self, dim: int, k: int = 3) -> None:
        super().__init__()
        self.norm = MobileOneBlock(
            dim, dim, k, groups=dim, num_conv_branches=0, activation=None, use_scale_branch=False
        )
        self.mixer = MobileOneBlock(dim, dim, k, groups=dim, activation=None)
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    """FastViT's convolutional FFN: depthwise 7x7 conv-BN, 1x1 (dim -> hidden), GELU, 1x1 back."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = _conv_bn(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """FastViT block: ``x = token_mixer(x)`` (RepMixer), ``x + layer_scale * convffn(x)``."""

    def __init__(self, dim: int, mlp_ratio: float = 3.0) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class FastViT(nn.Module):
    """FastViT without attention stages (apple/ml-fastvit ``models/fastvit.py`` layout): a stem
    of three MobileOneBlocks (3x3/2, depthwise 3x3/2, 1x1; GELU), RepMixer stages joined by
    PatchEmbeds, GAP, linear head (upstream's final conv_exp + SE is left out)."""

    def __init__(
        self,
        layers: list[int],
        embed_dims: list[int],
        mlp_ratio: float = 3.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        d0 = embed_dims[0]
        self.patch_embed = nn.Sequential(
            MobileOneBlock(3, d0, 3, 2, activation=nn.GELU),
            MobileOneBlock(d0, d0, 3, 2, groups=d0, activation=nn.GELU),
            MobileOneBlock(d0, d0, 1, activation=nn.GELU),
        )
        network: list[nn.Module] = []
        for i, (depth, dim) in enumerate(zip(layers, embed_dims, strict=True)):
            if i > 0:
                network.append(PatchEmbed(embed_dims[i - 1], dim))
            network.append(nn.Sequential(*(RepMixerBlock(dim, mlp_ratio) for _ in range(depth))))
        self.network = nn.Sequential(*network)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.network(self.patch_embed(x))
        return self.head(torch.flatten(self.gap(x), 1))


def _fastvit_t() -> nn.Module:
    """FastViT-T8-style, train-time, no attention: RepMixer x [2, 2, 4, 2], random layer scales."""
    model = FastViT([2, 2, 4, 2], [48, 96, 192, 384])
    _init_weights(model)
    for m in model.modules():
        if isinstance(m, MobileOneBlock):
            convs = [b.conv for b in [*m.rbr_conv, m.rbr_scale] if b is not None]
            for conv in convs:
                _scale_(conv, _branch_scale(len(convs), m.rbr_skip is not None))
        elif isinstance(m, ReparamLargeKernelConv):
            for conv in (m.lkb_origin.conv, m.small_conv.conv):
                _scale_(conv, _branch_scale(2, False))
    # Each block adds two residual branches whose layer scale is O(1) and whose mixer - norm
    # difference holds two unrelated BNs: scaled like MobileOne's alone, magnitudes still grow
    # ~3x per stage. So the mixer's convs and the FFN's output get a further 1/2, and the FFN's
    # depthwise 7x7 1/sqrt(2) (Kaiming's gain of 2 assumes a ReLU before it; there is none).
    for m in model.modules():
        if isinstance(m, RepMixer):
            _scale_(m.mixer.rbr_conv[0].conv, 0.5)
            _scale_(m.mixer.rbr_scale.conv, 0.5)
        elif isinstance(m, ConvFFN):
            _scale_(m.conv.conv, 1 / math.sqrt(2))
            _scale_(m.fc2, 0.5 * _branch_scale(1, True))
    # layer scales start at 1e-5 upstream, which would make every RepMixer (nearly) the
    # identity and its rewrite untestable; here they are random, U(0.5, 1.5) per channel
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (RepMixer, RepMixerBlock)):
                m.layer_scale.uniform_(0.5, 1.5)
    return model


# --------------------------------------------------------------------------------------------
# SESR (super-resolution, expanded linear blocks)


class LinearBlock(nn.Module):
    """SESR's expanded linear block (ARM-software/sesr ``LinearBlock_e``): kxk conv (cin ->
    ``feature_size``, padding k//2, bias) then 1x1 conv (-> cout, bias), nothing in between."""

    def __init__(self, cin: int, cout: int, k: int, feature_size: int = 256) -> None:
        super().__init__()
        self.conv_expand = nn.Conv2d(cin, feature_size, k, padding=k // 2)
        self.conv_squeeze = nn.Conv2d(feature_size, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_squeeze(self.conv_expand(x))


class SESR(nn.Module):
    """SESR (ARM-software/sesr ``models/sesr.py``, training with expanded linear blocks):
    a 5x5 input block, ``m`` residual 3x3 blocks each followed by a per-channel PReLU, a long
    residual, a 5x5 output block to scale**2 channels, the input added (broadcast over those
    channels), depth-to-space. Upstream's ``inputs - 0.5`` and final clip to [0, 1] are left out.
    """

    def __init__(self, m: int = 5, f: int = 16, feature_size: int = 256, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.input_block = LinearBlock(1, f, 5, feature_size)
        self.linear_blocks = nn.ModuleList(LinearBlock(f, f, 3, feature_size) for _ in range(m))
        self.activations = nn.ModuleList(nn.PReLU(f) for _ in range(m))
        self.output_block = LinearBlock(f, scale**2, 5, feature_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features_0 = features = self.input_block(x)
        for block, activation in zip(self.linear_blocks, self.activations, strict=True):
            features = activation(block(features) + features)
        out = self.output_block(features + features_0) + x
        return F.pixel_shuffle(out, self.scale)


def _sesr_m5() -> nn.Module:
    """SESR-M5 x2 super-resolution, train-time expanded linear blocks (f=16, 256 inside)."""
    model = SESR()
    _init_weights(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                # random biases, so that folding them through the next conv is checked
                nn.init.normal_(m.bias, 0.0, 0.05)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
        for block in model.linear_blocks:
            _scale_(block.conv_squeeze, _branch_scale(1, True))
    return model


# --------------------------------------------------------------------------------------------
# ViT


class Attention(nn.Module):
    """Multi-head self-attention written out by hand (FX-traceable, ONNX-exportable)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.dim)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block: x + attn(ln(x)); x + mlp(ln(x)), GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: Conv2d patch embedding, cls token, learned position embedding, encoder, head."""

    def __init__(
        self,
        image: int = 224,
        patch: int = 16,
        dim: int = 384,
        depth: int = 4,
        heads: int = 6,
        mlp_dim: int = 1536,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B x N x D
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _vit_s() -> nn.Module:
    """Small ViT: 224x224, patch 16, d=384, 6 heads, 4 pre-LN layers, MLP 1536 (GELU)."""
    model = VisionTransformer()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    return model


# --------------------------------------------------------------------------------------------
# digits CNN (trained)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def digits_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits: images float32 N x 1 x 8 x 8 in [0, 1], labels int64.

    A fixed-seed 80/20 split: ``split`` is "train" (1438 images) or "test" (359 images).
    """
    xtr, ytr, xte, yte = _digits_arrays()
    if split == "train":
        return xtr.clone(), ytr.clone()
    if split == "test":
        return xte.clone(), yte.clone()
    raise GraphoptError(f"unknown digits split {split!r}; expected 'train' or 'test'.")


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits: two conv3x3-BN-ReLU layers, 2x2 max-pool, linear to 10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@functools.lru_cache(maxsize=8)
def _trained_digits_state(seed: int) -> dict[str, torch.Tensor]:
    """Trained weights, cached in-process and on disk (a corrupt cache file is retrained)."""
    path = cache_dir() / "zoo" / f"digits_cnn-seed{seed}-v1.pt"
    try:
        state = torch.load(path, weights_only=True)
        if set(state) == set(DigitsCNN().state_dict()):
            return state
    except Exception:  # noqa: BLE001 - missing or unreadable cache: train
        pass
    state = _train_digits(seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return state


def _train_digits(seed: int) -> dict[str, torch.Tensor]:
    x, y = digits_data("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster and immune to load
    try:
        return _train_digits_loop(seed, x, y)
    finally:
        torch.set_num_threads(threads)


def _train_digits_loop(seed: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(12):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _digits_cnn(seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Small CNN trained (Adam, 12 epochs, batch 64) on the digits train split; real BN stats."""
    model = DigitsCNN()  # its random init is overwritten right away
    model.load_state_dict(_trained_digits_state(seed))
    return model.eval(), (digits_data("test")[0][:1],)


# --------------------------------------------------------------------------------------------
# registry


_RANDOM: dict[str, Callable[[], nn.Module]] = {
    "acnet_resnet18": _acnet_resnet18,
    "dbb_resnet18": _dbb_resnet18,
    "fastvit_t": _fastvit_t,
    "mobilenetv2": _mobilenetv2,
    "mobileone_s0": _mobileone_s0,
    "repvgg_a0": _repvgg_a0,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "sesr_m5": _sesr_m5,
    "vit_s": _vit_s,
}

# Where a model's input or task is not the default: one 224x224 RGB image, classification.
_INPUT_SHAPE: dict[str, tuple[int, ...]] = {"sesr_m5": (1, 1, 128, 128)}
_TASK: dict[str, str] = {"sesr_m5": "super-resolution"}


def _first_line(fn: Callable[..., object]) -> str:
    return " ".join((fn.__doc__ or "").split())


def names() -> list[str]:
    """Names of all zoo models, sorted."""
    return sorted([*_RANDOM, "digits_cnn"])


def describe(name: str) -> str:
    """One line about zoo model ``name`` (without building it)."""
    if name == "digits_cnn":
        return _first_line(_digits_cnn)
    if name not in _RANDOM:
        raise GraphoptError(
            f"unknown zoo model {name!r}; available: {', '.join(names())}."
            + close_matches(name, names())
        )
    return _first_line(_RANDOM[name])


def get(name: str, *, seed: int = 0) -> ZooModel:
    """Build zoo model ``name`` afresh (deterministic for a ``seed``), in eval mode.

    Raises GraphoptError for an unknown name. Leaves torch's global RNG state untouched.
    """
    if name == "digits_cnn":
        with torch.random.fork_rng(devices=[]):
            model, inputs = _digits_cnn(seed)
        return ZooModel(name, model, inputs, _first_line(_digits_cnn), "classification")
    if name not in _RANDOM:
        raise GraphoptError(
            f"unknown zoo model {name!r}; available: {', '.join(names())}."
            + close_matches(name, names())
        )
    build = _RANDOM[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    gen = torch.Generator().manual_seed(seed)
    randomize_bn_stats_(model, gen)
    model.eval()
    inputs = (torch.randn(*_INPUT_SHAPE.get(name, (1, 3, 224, 224)), generator=gen),)
    return ZooModel(name, model, inputs, _first_line(build), _TASK.get(name, "classification"))

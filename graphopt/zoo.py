"""Built-in models for tests, examples and benchmarks; nothing is downloaded.

    >>> from graphopt import zoo
    >>> zoo.names()
    ['digits_cnn', 'mobilenetv2', 'mobileone_s0', 'repvgg_a0', 'resnet18', 'resnet50', 'vit_s']
    >>> m = zoo.get("resnet18")
    >>> y = m.model(*m.example_inputs)

Every model is written in plain torch (no torchvision), is FX-traceable with
``torch.fx.symbolic_trace`` and exports to ONNX with a dynamic batch dimension.

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

from graphopt.errors import GraphoptError, close_matches

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
        self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
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
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
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
    conv-BN branch (when k > 1) and an identity BN branch (when shapes allow), summed, ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.num_conv_branches = num_conv_branches
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            _conv_bn(cin, cout, k, stride, groups) for _ in range(num_conv_branches)
        )
        self.rbr_scale = _conv_bn(cin, cout, 1, stride, groups) if k > 1 else None
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_conv[0](x)
        for branch in self.rbr_conv[1:]:
            out = out + branch(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return self.activation(out)


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
    from graphopt.backends.measure import default_cache_dir

    path = default_cache_dir() / "zoo" / f"digits_cnn-seed{seed}-v1.pt"
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
    "mobilenetv2": _mobilenetv2,
    "mobileone_s0": _mobileone_s0,
    "repvgg_a0": _repvgg_a0,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "vit_s": _vit_s,
}


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
    inputs = (torch.randn(1, 3, 224, 224, generator=gen),)
    return ZooModel(name, model, inputs, _first_line(build), "classification")

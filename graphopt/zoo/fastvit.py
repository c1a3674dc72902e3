"""FastViT (train-time, RepMixer stages only)."""

from __future__ import annotations

import math

import torch
from torch import nn

from graphopt.zoo.common import branch_scale, conv_bn, init_weights, scale_
from graphopt.zoo.mobileone import MobileOneBlock


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
        self.lkb_origin = conv_bn(cin, cout, k, stride, groups)
        self.small_conv = conv_bn(cin, cout, small_kernel, stride, groups)
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
        self.conv = conv_bn(dim, dim, 7, groups=dim)
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


def fastvit_t() -> nn.Module:
    """FastViT-T8-style, train-time, no attention: RepMixer x [2, 2, 4, 2], random layer scales."""
    model = FastViT([2, 2, 4, 2], [48, 96, 192, 384])
    init_weights(model)
    for m in model.modules():
        if isinstance(m, MobileOneBlock):
            m.scale_branches_()
        elif isinstance(m, ReparamLargeKernelConv):
            for conv in (m.lkb_origin.conv, m.small_conv.conv):
                scale_(conv, branch_scale(2, False))
    # Each block adds two residual branches whose layer scale is O(1) and whose mixer - norm
    # difference holds two unrelated BNs: scaled like MobileOne's alone, magnitudes still grow
    # ~3x per stage. So the mixer's convs and the FFN's output get a further 1/2, and the FFN's
    # depthwise 7x7 1/sqrt(2) (Kaiming's gain of 2 assumes a ReLU before it; there is none).
    for m in model.modules():
        if isinstance(m, RepMixer):
            scale_(m.mixer.rbr_conv[0].conv, 0.5)
            scale_(m.mixer.rbr_scale.conv, 0.5)
        elif isinstance(m, ConvFFN):
            scale_(m.conv.conv, 1 / math.sqrt(2))
            scale_(m.fc2, 0.5 * branch_scale(1, True))
    # layer scales start at 1e-5 upstream, which would make every RepMixer (nearly) the
    # identity and its rewrite untestable; here they are random, U(0.5, 1.5) per channel
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (RepMixer, RepMixerBlock)):
                m.layer_scale.uniform_(0.5, 1.5)
    return model

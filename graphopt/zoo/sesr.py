"""SESR (super-resolution, expanded linear blocks)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from graphopt.zoo.common import branch_scale, init_weights, scale_


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


def sesr_m5() -> nn.Module:
    """SESR-M5 x2 super-resolution, train-time expanded linear blocks (f=16, 256 inside)."""
    model = SESR()
    init_weights(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                # random biases, so that folding them through the next conv is checked
                nn.init.normal_(m.bias, 0.0, 0.05)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
        for block in model.linear_blocks:
            scale_(block.conv_squeeze, branch_scale(1, True))
    return model

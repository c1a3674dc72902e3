"""MobileOne (train-time, over-parameterised); its block is FastViT's too."""

from __future__ import annotations

import torch
from torch import nn

from graphopt.errors import GraphoptError
from graphopt.zoo.common import StagedNet, branch_scale, conv_bn, init_weights, scale_


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
            conv_bn(cin, cout, k, stride, groups) for _ in range(num_conv_branches)
        )
        use_scale = k > 1 and use_scale_branch
        self.rbr_scale = conv_bn(cin, cout, 1, stride, groups) if use_scale else None
        if not num_conv_branches and self.rbr_scale is None and self.rbr_skip is None:
            raise GraphoptError("MobileOneBlock: no branch left; give it a conv branch.")
        self.activation = activation() if activation is not None else None

    def scale_branches_(self) -> None:
        """Scale the conv branches' Kaiming-initialised weights so that their sum keeps the
        input's variance (:func:`~graphopt.zoo.common.branch_scale`)."""
        convs = [b.conv for b in [*self.rbr_conv, self.rbr_scale] if b is not None]
        for conv in convs:
            scale_(conv, branch_scale(len(convs), self.rbr_skip is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in [*self.rbr_conv, self.rbr_scale, self.rbr_skip]:
            if branch is not None:
                out = branch(x) if out is None else out + branch(x)
        return out if self.activation is None else self.activation(out)


class MobileOne(StagedNet):
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


def mobileone_s0() -> nn.Module:
    """MobileOne-S0, train-time: 4 conv branches per block, blocks [2, 8, 10, 1],
    width (0.75, 1.0, 1.0, 2.0), no squeeze-excitation."""
    model = MobileOne([2, 8, 10, 1], [0.75, 1.0, 1.0, 2.0], num_conv_branches=4)
    init_weights(model)
    for m in model.modules():
        if isinstance(m, MobileOneBlock):
            m.scale_branches_()
    return model

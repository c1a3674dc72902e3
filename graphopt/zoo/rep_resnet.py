"""ResNet-18 with re-parameterisable conv-BN blocks: DiverseBranchBlock, ACNet (train-time)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from graphopt.zoo.common import branch_scale, conv_bn, init_weights, scale_
from graphopt.zoo.resnet import ResNet


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
        self.dbb_origin = conv_bn(cin, cout, k, stride, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(cout, p))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, groups)
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
    init_weights(model)
    # As _resnet: the residual branch is scaled by 1/sqrt(2); on top, each of the n summed
    # branches of a re-parameterisable block by 1/sqrt(n) (the stem's too).
    for m in model.modules():
        if isinstance(m, RepBasicBlock):
            for conv in m.conv2.branch_convs():
                scale_(conv, 1 / math.sqrt(2))
            if m.downsample is not None:
                scale_(m.downsample[0], 1 / math.sqrt(2))
    for m in model.modules():
        if isinstance(m, (DiverseBranchBlock, ACBlock)):
            convs = m.branch_convs()
            for conv in convs:
                scale_(conv, branch_scale(len(convs), False))
    return model


def dbb_resnet18() -> nn.Module:
    """ResNet-18, train-time DiverseBranchBlocks (4 branches) for the 7x7 stem and each 3x3."""
    return _rep_resnet18(DBBResNet, DBBBasicBlock)


def acnet_resnet18() -> nn.Module:
    """ResNet-18, train-time ACNet: each block's 3x3 conv-BN is 3x3 + 1x3 + 3x1 conv-BN."""
    return _rep_resnet18(ResNet, ACBBasicBlock)

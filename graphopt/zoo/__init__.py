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


The table of models is :data:`graphopt.zoo.registry.TABLE`; each family lives in its own module
(``resnet``, ``mobilenet``, ``repvgg``, ``mobileone``, ``rep_resnet`` for DBB and ACNet,
``fastvit``, ``sesr``, ``vit``, ``digits``), with what they share in ``common``.
"""

from __future__ import annotations

from graphopt.zoo.common import randomize_bn_stats_
from graphopt.zoo.digits import DigitsCNN, digits_data
from graphopt.zoo.fastvit import (
    ConvFFN,
    FastViT,
    PatchEmbed,
    ReparamLargeKernelConv,
    RepMixer,
    RepMixerBlock,
)
from graphopt.zoo.mobilenet import InvertedResidual, MobileNetV2
from graphopt.zoo.mobileone import MobileOne, MobileOneBlock
from graphopt.zoo.registry import ZooModel, describe, get, names
from graphopt.zoo.rep_resnet import (
    ACBBasicBlock,
    ACBlock,
    BNAndPad,
    DBBBasicBlock,
    DBBResNet,
    DiverseBranchBlock,
    IdentityBasedConv1x1,
    RepBasicBlock,
)
from graphopt.zoo.repvgg import RepVGG, RepVGGBlock
from graphopt.zoo.resnet import BasicBlock, Bottleneck, ResNet
from graphopt.zoo.sesr import SESR, LinearBlock
from graphopt.zoo.vit import Attention, TransformerBlock, VisionTransformer

__all__ = [
    "ZooModel",
    "describe",
    "digits_data",
    "get",
    "names",
    "randomize_bn_stats_",
    # the building blocks, for tests and for users who assemble their own
    "ACBBasicBlock",
    "ACBlock",
    "Attention",
    "BNAndPad",
    "BasicBlock",
    "Bottleneck",
    "ConvFFN",
    "DBBBasicBlock",
    "DBBResNet",
    "DigitsCNN",
    "DiverseBranchBlock",
    "FastViT",
    "IdentityBasedConv1x1",
    "InvertedResidual",
    "LinearBlock",
    "MobileNetV2",
    "MobileOne",
    "MobileOneBlock",
    "PatchEmbed",
    "RepBasicBlock",
    "RepMixer",
    "RepMixerBlock",
    "RepVGG",
    "RepVGGBlock",
    "ReparamLargeKernelConv",
    "ResNet",
    "SESR",
    "TransformerBlock",
    "VisionTransformer",
]

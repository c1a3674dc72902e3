"""Small models, seeded generators and random BatchNorm for tests (never the identity
BatchNorm)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphopt.zoo.common import randomize_bn_


def seeded(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator: tests draw from their own, never from the global RNG."""
    return torch.Generator().manual_seed(seed)


def random_bn(cls: type[nn.Module], channels: int, seed: int = 0, **kwargs: Any) -> nn.Module:
    """``cls(channels, **kwargs)`` with random statistics and affine parameters (never identity)."""
    bn = cls(channels, **kwargs)
    randomize_bn(bn, seeded(seed))
    return bn


def random_input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` from its own generator."""
    return torch.randn(shape, generator=seeded(seed))


def randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    """Random running statistics and affine parameters: never the identity BatchNorm (the zoo's
    distributions, :func:`graphopt.zoo.randomize_bn_stats_`)."""
    randomize_bn_(bn, gen)


def small_conv_net(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Conv-BN-ReLU (random BN statistics), global pooling, a linear classifier, and an input
    of shape (1, 3, 16, 16): the smallest model that exercises a backend's usual operators."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    randomize_bn(model[1], torch.Generator().manual_seed(seed))
    return model, torch.randn(1, 3, 16, 16)

"""The zoo's table: one row per model (how to build it, its family, input and task), and
:func:`names`, :func:`describe` and :func:`get` over it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphopt._util import close_matches
from graphopt.errors import GraphoptError
from graphopt.zoo.common import randomize_bn_stats_
from graphopt.zoo.digits import digits_cnn
from graphopt.zoo.fastvit import fastvit_t
from graphopt.zoo.mobilenet import mobilenetv2
from graphopt.zoo.mobileone import mobileone_s0
from graphopt.zoo.rep_resnet import acnet_resnet18, dbb_resnet18
from graphopt.zoo.repvgg import repvgg_a0
from graphopt.zoo.resnet import resnet18, resnet50
from graphopt.zoo.sesr import sesr_m5
from graphopt.zoo.vit import vit_s


@dataclass(frozen=True)
class ZooModel:
    """A model of the zoo: an eval-mode module, inputs to run it on, and what it is."""

    name: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    description: str
    task: str


@dataclass(frozen=True)
class Entry:
    """A row of the table. ``build()`` makes the model with random weights from torch's global
    RNG (seeded by :func:`get`), which then gets random BatchNorm statistics and a standard-normal
    input of ``input_shape``. A ``trained`` row's ``build(seed)`` returns the trained eval-mode
    model and its example inputs itself. The description is the docstring of ``build``."""

    name: str
    family: str
    build: Callable[..., Any]
    input_shape: tuple[int, ...] = (1, 3, 224, 224)
    task: str = "classification"
    trained: bool = False

    @property
    def description(self) -> str:
        return " ".join((self.build.__doc__ or "").split())


TABLE: tuple[Entry, ...] = (
    Entry("acnet_resnet18", "rep_resnet", acnet_resnet18),
    Entry("dbb_resnet18", "rep_resnet", dbb_resnet18),
    Entry("digits_cnn", "digits", digits_cnn, (1, 1, 8, 8), trained=True),
    Entry("fastvit_t", "fastvit", fastvit_t),
    Entry("mobilenetv2", "mobilenet", mobilenetv2),
    Entry("mobileone_s0", "mobileone", mobileone_s0),
    Entry("repvgg_a0", "repvgg", repvgg_a0),
    Entry("resnet18", "resnet", resnet18),
    Entry("resnet50", "resnet", resnet50),
    Entry("sesr_m5", "sesr", sesr_m5, (1, 1, 128, 128), "super-resolution"),
    Entry("vit_s", "vit", vit_s),
)
_BY_NAME = {entry.name: entry for entry in TABLE}


def names() -> list[str]:
    """Names of all zoo models, sorted."""
    return sorted(_BY_NAME)


def entry(name: str) -> Entry:
    """The table's row for ``name``; GraphoptError (with close matches) for an unknown name."""
    if name not in _BY_NAME:
        raise GraphoptError(
            f"unknown zoo model {name!r}; available: {', '.join(names())}."
            + close_matches(name, names())
        )
    return _BY_NAME[name]


def describe(name: str) -> str:
    """One line about zoo model ``name`` (without building it)."""
    return entry(name).description


def get(name: str, *, seed: int = 0) -> ZooModel:
    """Build zoo model ``name`` afresh (deterministic for a ``seed``), in eval mode.

    Raises GraphoptError for an unknown name. Leaves torch's global RNG state untouched.
    """
    row = entry(name)
    if row.trained:
        with torch.random.fork_rng(devices=[]):
            model, inputs = row.build(seed)
        return ZooModel(name, model, inputs, row.description, row.task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = row.build()
    gen = torch.Generator().manual_seed(seed)
    randomize_bn_stats_(model, gen)
    model.eval()
    inputs = (torch.randn(*row.input_shape, generator=gen),)
    return ZooModel(name, model, inputs, row.description, row.task)

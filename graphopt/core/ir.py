"""What the pass manager needs to know about the IR its passes rewrite.

graphopt runs two stages under one :class:`~graphopt.pipeline.PassManager`: the FX stage (passes
over a ``torch.fx.GraphModule``) and the ONNX stage of int8 (passes over an ``onnx.ModelProto``,
:mod:`graphopt.quant.onnx_passes`). The manager is the same; what differs is how a model is
copied for rollback, checked after a pass, run on the sample inputs, and saved for a
reproducer. That is an :class:`IR` (the pass contract is independent of the IR, as in onnx-ir's
pass infrastructure). :data:`FX` is the FX stage's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import fx

from graphopt.core.copying import deep_copy
from graphopt.core.numerics import rounding_error, run_module
from graphopt.core.printing import canonical_ir


class IR(Protocol):
    """How the pass manager copies, checks, runs and saves a model of one IR."""

    name: str
    locator: str  # "module:attribute" of this IR object, for reproducer scripts

    def copy(self, model: Any) -> Any:
        """A copy for rollback (the pass may mutate ``model`` in place)."""

    def validate(self, model: Any) -> None:
        """Raise if ``model`` is not a well-formed model of this IR (after a pass ran)."""

    def run(self, model: Any, sample: Sequence[Any]) -> list[torch.Tensor]:
        """The outputs of ``model`` on one input tuple, flattened, as torch tensors."""

    def rounding(
        self, model: Any, sample: Sequence[Any], outputs: Sequence[torch.Tensor]
    ) -> list[float] | None:
        """Per output, the model's own float32 rounding error; ``None`` where not measurable."""

    def save(self, model: Any, directory: Path) -> str:
        """Write ``model`` into ``directory``; return Python that loads it as ``model``."""

    def text(self, model: Any, *, types: bool = False) -> str:
        """A printable form of ``model`` (IR dumps, reproducers, ``--print-ir``)."""


class FxIR:
    """The FX stage: ``fx.GraphModule`` rewritten in place, linted and recompiled after a pass."""

    name = "fx"
    locator = "graphopt.core.ir:FX"

    def copy(self, model: fx.GraphModule) -> fx.GraphModule:
        with torch.inference_mode(False):  # the backup stays trainable, like the graph
            return deep_copy(model)

    def validate(self, model: fx.GraphModule) -> None:
        model.graph.lint()
        model.recompile()

    def run(self, model: torch.nn.Module, sample: Sequence[Any]) -> list[torch.Tensor]:
        return run_module(model, sample)

    def rounding(self, model, sample, outputs) -> list[float] | None:
        return rounding_error(model, sample, outputs)

    def save(self, model: fx.GraphModule, directory: Path) -> str:
        torch.save(model, directory / "graph.pt")
        return 'model = torch.load(here / "graph.pt", weights_only=False)'

    def text(self, model: fx.GraphModule, *, types: bool = False) -> str:
        return canonical_ir(model, types=types)


FX = FxIR()

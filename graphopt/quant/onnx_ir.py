"""The ONNX stage's IR: an ``onnx.ModelProto``, as the pass manager copies, checks, runs and saves it.

:data:`ONNX` is what :class:`~graphopt.pipeline.PassManager` needs (``ir=ONNX``) to run the int8
stage's passes (:mod:`graphopt.quant.onnx_passes`) under the same contract as the FX passes:
a copy for rollback, ``onnx.checker`` after each pass, the outputs on the sample inputs from an
ONNX Runtime session (with :data:`~graphopt.backends.onnxruntime.EXACT_INT8_CONFIG`, all graph
optimisations: what the artifact runs), a file and a loader line for reproducers, and the
textual form (``onnx.printer``, large constants elided) for IR dumps.

    >>> pm = PassManager([SmoothQuant()], ir=ONNX)                     # doctest: +SKIP
    >>> pm.run(proto, PassContext(sample_inputs=(x,), calibration_data=batches))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import printer

from graphopt._util import first_line
from graphopt.errors import PassError
from graphopt.quant.graph import input_dtype, input_names
from graphopt.quant.runtime import session

__all__ = ["ONNX", "OnnxIR"]

_SHOWN_ELEMENTS = 8  # constants up to this size are printed (scales, zero points, shapes)
_DATA_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
    "string_data",
)


class OnnxIR:
    """The int8 stage: ``onnx.ModelProto`` rewritten by copy, checked by ``onnx.checker``."""

    name = "onnx"
    locator = "graphopt.quant.onnx_ir:ONNX"

    def copy(self, model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out

    def validate(self, model: Any) -> None:
        if not isinstance(model, onnx.ModelProto):
            raise PassError(
                f"an ONNX-stage pass returned a {type(model).__name__}, not an onnx.ModelProto."
            )
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise PassError(
                f"the ONNX model after the pass is not valid ONNX: {first_line(exc)}. The pass "
                "wrote a malformed graph; report it with the reproducer."
            ) from exc

    def run(self, model: onnx.ModelProto, sample: Sequence[Any]) -> list[torch.Tensor]:
        names = input_names(model)
        feed = {
            name: np.ascontiguousarray(
                torch.as_tensor(x).detach().cpu().numpy().astype(input_dtype(model, name))
            )
            for name, x in zip(names, sample, strict=True)
        }
        return [torch.from_numpy(np.asarray(o)) for o in session(model, "all").run(None, feed)]

    def rounding(self, model, sample, outputs) -> list[float] | None:
        return None  # no float64 run of an ONNX graph: exact contracts use their fixed rtol

    def save(self, model: onnx.ModelProto, directory: Path) -> str:
        onnx.save(model, str(directory / "model.onnx"))
        return 'import onnx; model = onnx.load(str(here / "model.onnx"))'

    def text(self, model: onnx.ModelProto, *, types: bool = False) -> str:
        shown = self.copy(model)
        for t in shown.graph.initializer:
            if int(np.prod(t.dims)) > _SHOWN_ELEMENTS:
                for data in _DATA_FIELDS:
                    t.ClearField(data)
        return printer.to_text(shown)


ONNX = OnnxIR()

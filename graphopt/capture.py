"""Capture: an ``nn.Module`` or an ONNX model -> ``torch.fx.GraphModule`` with shape metadata.

Order of attempts for a module:
1. ``torch.fx.symbolic_trace`` (with the user's ``leaf_modules`` / ``concrete_args``): keeps
   ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear`` as ``call_module`` nodes, which structural
   passes need.
2. ``torch.export`` when symbolic tracing fails (control flow on shapes, for example); the
   capture notes say so, and the report shows it. Needs example inputs.
3. Both failed: :class:`CaptureError` naming the failing line and the fixes.

ONNX models (a path, bytes or a ``ModelProto``) go through :mod:`graphopt.onnx_import`.
The user's model is deep-copied first: passes rewrite the copy, never the original.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import traceback
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from graphopt.errors import CaptureError, InputError

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape (``None`` for a dynamic dimension) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        dims = ",".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {str(self.dtype).replace('torch.', '')}[{dims}]"


@dataclass
class Captured:
    """A captured model: the graph, how it was captured, and the inputs it takes."""

    graph: fx.GraphModule
    method: str  # "symbolic_trace" | "torch.export" | "onnx"
    example_inputs: tuple[torch.Tensor, ...]
    inputs: list[InputSpec]
    notes: list[str] = field(default_factory=list)


def is_onnx_input(model: Any) -> bool:
    if isinstance(model, str | os.PathLike):
        return True
    if isinstance(model, bytes):
        return True
    return type(model).__name__ == "ModelProto"


def capture(
    model: Any,
    example_inputs: Sequence[Any] | None = None,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Captured:
    """Capture ``model`` (an ``nn.Module``, an ``.onnx`` path, bytes or a ``ModelProto``).

    >>> cap = capture(model, (torch.randn(1, 3, 224, 224),))
    >>> cap.method, len(cap.graph.graph.nodes)
    ('symbolic_trace', 123)
    """
    if is_onnx_input(model):
        return _capture_onnx(model, example_inputs)
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"graphopt optimizes a torch.nn.Module, an .onnx path or an "
            f"onnx.ModelProto; got {type(model).__name__}."
        )
    inputs = _as_tensors(example_inputs) if example_inputs is not None else None
    model = _copy_model(model, "graphopt works")
    notes: list[str] = []
    if model.training:
        notes.append(
            "the model was in training mode; graphopt captured it in eval mode "
            "(BatchNorm running statistics, no dropout), as it will be deployed"
        )
    model.eval()
    if inputs is not None:
        _check_runs(model, inputs)
    try:
        gm = _symbolic_trace(model, leaf_modules, concrete_args)
        method = "symbolic_trace"
        if frozen := _frozen_constants(gm):
            notes.append(
                f"{len(frozen)} tensor(s) computed without reading the inputs were frozen into "
                f"constants by symbolic tracing ({', '.join(frozen[:3])}); if the model creates "
                "random or time-dependent tensors in forward, they no longer change per call"
            )
    except Exception as trace_exc:  # noqa: BLE001 - any tracing failure leads to the fallback
        where = _failing_line(trace_exc)
        if inputs is None:
            raise CaptureError(
                _capture_message(trace_exc, where, None, fallback=False)
            ) from trace_exc
        try:
            gm = torch.export.export(model, inputs, strict=False).module()
            method = "torch.export"
        except Exception as export_exc:  # noqa: BLE001
            raise CaptureError(
                _capture_message(trace_exc, where, export_exc, fallback=True)
            ) from trace_exc
        notes.append(
            f"symbolic tracing failed ({_first_line(trace_exc)} at {where[0]}); "
            "captured with torch.export instead: module-level passes see aten ops"
        )
        log.info("capture fell back to torch.export: %s", _first_line(trace_exc))
    if inputs is None:
        raise InputError(
            "example_inputs are needed to record shapes and to verify each pass; "
            "pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)."
        )
    annotate_shapes(gm, inputs)
    specs = [
        InputSpec(n.name, (None, *t.shape[1:]) if t.dim() else (), t.dtype)
        for n, t in zip(_placeholders(gm), inputs, strict=False)
    ]
    return Captured(gm, method, inputs, specs, notes)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = ()) -> None:
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _symbolic_trace(model: nn.Module, leaf_modules, concrete_args) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=concrete_args)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _frozen_constants(gm: fx.GraphModule) -> list[str]:
    """Tensors the tracer evaluated once and stored (``torch.randn(4)``, ``torch.arange(n)``)."""
    return [
        n.target
        for n in gm.graph.nodes
        if n.op == "get_attr" and n.target.startswith("_tensor_constant")
    ]


def annotate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running ``gm`` once."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _copy_model(model: nn.Module, who: str) -> nn.Module:
    """A deep copy of the user's module, so that nothing graphopt does can change theirs."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise CaptureError(
            f"could not copy the model ({type(exc).__name__}: {exc}); {who} on a copy so that "
            "your model is never changed. Make the module deep-copyable (no open files or "
            "locks as attributes)."
        ) from exc


def _as_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, list | tuple):
        raise InputError(
            f"example_inputs must be a tuple of tensors, e.g. (x,); got "
            f"{type(example_inputs).__name__}."
        )
    out = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor):
            out.append(x.detach())
        elif type(x).__module__ == "numpy":
            out.append(torch.from_numpy(x))
        else:
            raise InputError(
                f"example input {i} is a {type(x).__name__}; graphopt takes "
                "torch tensors or numpy arrays."
            )
    return tuple(out)


def _check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
        raise InputError(
            f"the model raised on the example inputs ({shapes}): "
            f"{type(exc).__name__}: {_first_line(exc)}. Pass inputs of the shape "
            "and dtype the model expects."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _failing_line(exc: BaseException) -> tuple[str, str]:
    """('file.py:42 in forward (MyBlock): if x.sum() > 0:', 'MyBlock'): the line that broke."""
    frames = traceback.extract_tb(exc.__traceback__)
    tb = exc.__traceback__
    owners: dict[tuple[str, int], str] = {}
    while tb is not None:
        self_obj = tb.tb_frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module):
            owners[(tb.tb_frame.f_code.co_filename, tb.tb_lineno)] = type(self_obj).__name__
        tb = tb.tb_next
    user = [f for f in frames if not f.filename.startswith(_TORCH_DIR)]
    if not user:
        return "an unknown line", ""
    f = user[-1]
    owner = owners.get((f.filename, f.lineno))
    owner_text = f" ({owner})" if owner else ""
    text = f"{Path(f.filename).name}:{f.lineno} in {f.name}{owner_text}: {(f.line or '').strip()}"
    return text, owner or ""


def _capture_message(
    trace_exc: BaseException,
    where: tuple[str, str],
    export_exc: BaseException | None,
    *,
    fallback: bool,
) -> str:
    where, owner = where
    leaf = f"leaf_modules=[{owner}]" if owner else "leaf_modules=[TheModuleClass]"
    lines = [
        f"could not capture the model: symbolic tracing failed at {where}",
        f"  tracing error: {_first_line(trace_exc)}",
    ]
    if fallback and export_exc is not None:
        lines.append(
            f"  torch.export fallback also failed: {type(export_exc).__name__}: "
            f"{_first_line(export_exc)}"
        )
    elif not fallback:
        lines.append("  no example_inputs were given, so the torch.export fallback could not run")
    lines += [
        "How to fix it:",
        f"  - keep the module with that line opaque: capture(model, x, {leaf}) / "
        f"optimize(..., leaf_modules=[...]);",
        "  - if the branch depends on a non-tensor argument, fix it with concrete_args={'flag': "
        "True};",
        "  - or rewrite data-dependent control flow with torch.where / torch.cond.",
    ]
    return "\n".join(lines)


def _capture_onnx(model: Any, example_inputs: Sequence[Any] | None) -> Captured:
    from graphopt import onnx_import

    if (
        isinstance(model, str | os.PathLike)
        and not str(model).endswith(".onnx")
        and not Path(model).exists()
    ):
        raise CaptureError(f"{model!r} is neither an existing .onnx file nor a zoo model name.")
    gm = onnx_import.import_onnx(model)
    placeholders = _placeholders(gm)
    if example_inputs is None:
        inputs = tuple(_example_for(n) for n in placeholders)
        notes = [
            "ONNX model imported; example inputs generated from its declared input shapes "
            "(symbolic dimensions set to 1)"
        ]
    else:
        inputs = _as_tensors(example_inputs)
        notes = ["ONNX model imported"]
    if len(inputs) != len(placeholders):
        raise InputError(
            f"the ONNX model takes {len(placeholders)} inputs "
            f"({', '.join(n.name for n in placeholders)}); got {len(inputs)}."
        )
    _check_runs(gm, inputs)
    annotate_shapes(gm, inputs)
    specs = []
    for n, t in zip(placeholders, inputs, strict=True):
        declared = n.meta.get("onnx_shape")
        if declared is not None and len(declared) == t.dim():
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in declared)
        else:
            shape = (None, *t.shape[1:]) if t.dim() else ()
        specs.append(InputSpec(n.name, shape, t.dtype))
    return Captured(gm, "onnx", inputs, specs, notes)


def _example_for(node: fx.Node) -> torch.Tensor:
    shape = node.meta.get("onnx_shape")
    dtype = node.meta.get("onnx_dtype", torch.float32)
    if shape is None:
        raise InputError(f"ONNX input {node.name!r} has no declared shape; pass example_inputs.")
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(dims, generator=gen).to(dtype)
    return torch.randint(0, 2, dims, generator=gen).to(dtype)


class _CallableModule(types.ModuleType):
    """``graphopt.capture`` is both this module and the function :func:`capture`: once anything
    has imported the module, the package attribute is the module (Python's import system sets
    it), so calling the module calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Captured:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

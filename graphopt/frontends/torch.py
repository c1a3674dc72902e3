"""Capture: an ``nn.Module`` or an ONNX model -> ``torch.fx.GraphModule`` with shape metadata.

Order of attempts for a module:
1. ``torch.fx.symbolic_trace`` (with the user's ``leaf_modules`` / ``concrete_args``): keeps
   ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear`` as ``call_module`` nodes, which structural
   passes need.
2. ``torch.export`` when symbolic tracing fails (control flow on shapes, for example); the
   capture notes say so, and the report shows it. Needs example inputs.
3. Both failed: :class:`CaptureError` naming the failing line and the fixes.

ONNX models (a path, bytes or a ``ModelProto``) go through :mod:`graphopt.frontends.onnx`.
The user's model is deep-copied first: passes rewrite the copy, never the original.
Example inputs are checked by :mod:`graphopt.frontends.inputs`; which axes are dynamic is
:mod:`graphopt.core.dynamic_axes` (``Captured.dynamic_axes``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from graphopt._util import first_line
from graphopt.backends.arrays import to_numpy
from graphopt.backends.export import EXPORT_LOCK  # torch's exporters share state
from graphopt.core.dynamic_axes import DynamicAxes, describe, resolve
from graphopt.errors import CaptureError, InputError
from graphopt.frontends.bind import bound_defaults, drop_bound_placeholders
from graphopt.frontends.inputs import (
    as_tensors,
    check_runs,
    discriminating_inputs,
)
from graphopt.frontends.onnx import import_onnx, load_onnx

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape (a dynamic axis is its dim name, ``"batch"``) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{self.name}: {str(self.dtype).replace('torch.', '')}[{dims}]"


@dataclass
class Captured:
    """A captured model: the graph, how it was captured, the inputs it takes and which of
    their axes are dynamic (keyed by :attr:`names`)."""

    graph: fx.GraphModule
    method: str  # "symbolic_trace" | "torch.export" | "onnx"
    example_inputs: tuple[torch.Tensor, ...]
    inputs: list[InputSpec]
    notes: list[str] = field(default_factory=list)
    dynamic_axes: DynamicAxes = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The interface's input names: an ONNX model's own, else the placeholders'."""
        return list(self.graph.meta.get("onnx_input_names") or [s.name for s in self.inputs])

    @property
    def check_inputs(self) -> list[tuple[torch.Tensor, ...]]:
        """The input samples every check runs on: the example inputs, and where one of them is
        constant (all zeros...), a seeded random sample of the same shapes and dtypes too."""
        extra = discriminating_inputs(self.example_inputs)
        return [self.example_inputs] + ([extra] if extra is not None else [])


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
    dynamic_axes: Any = None,
) -> Captured:
    """Capture ``model`` (an ``nn.Module``, an ``.onnx`` path, bytes or a ``ModelProto``).

    ``dynamic_axes`` (``{input: {axis: name}}``, see :mod:`graphopt.core.dynamic_axes`): the
    inputs' axes that may take any size; by default the batch of a module, and every symbolic
    dimension an ONNX model declares.

    >>> cap = capture(model, (torch.randn(1, 3, 224, 224),))
    >>> cap.method, len(cap.graph.graph.nodes)
    ('symbolic_trace', 123)
    """
    if is_onnx_input(model):
        return _capture_onnx(model, example_inputs, dynamic_axes)
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"graphopt optimizes a torch.nn.Module, an .onnx path or an "
            f"onnx.ModelProto; got {type(model).__name__}."
        )
    inputs = as_tensors(example_inputs) if example_inputs is not None else None
    model = copy_model(model, "graphopt works")
    notes: list[str] = []
    if model.training:
        notes.append(
            "the model was in training mode; graphopt captured it in eval mode "
            "(BatchNorm running statistics, no dropout), as it will be deployed"
        )
    model.eval()
    if inputs is not None:
        check_runs(model, inputs)
    fixed_batch = ""
    try:
        gm = _symbolic_trace(model, leaf_modules, concrete_args, inputs)
        method = "symbolic_trace"
        if frozen := _frozen_constants(gm):
            notes.append(
                f"{len(frozen)} tensor(s) computed without reading the inputs were frozen into "
                f"constants by symbolic tracing ({', '.join(frozen[:3])}); if the model creates "
                "random or time-dependent tensors in forward, they no longer change per call"
            )
    except Exception as trace_exc:  # noqa: BLE001 - any tracing failure leads to the fallback
        where = failing_line(trace_exc)
        if inputs is None:
            raise CaptureError(
                _capture_message(trace_exc, where, None, fallback=False)
            ) from trace_exc
        gm, fixed_batch = _export_fallback(model, inputs, dynamic_axes, trace_exc, where)
        method = "torch.export"
        notes += _export_notes(gm, trace_exc, where, fixed_batch)
        log.info("capture fell back to torch.export: %s", first_line(trace_exc))
    if inputs is None:
        raise InputError(
            "example_inputs are needed to record shapes and to verify each pass; "
            "pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)."
        )
    annotate_shapes(gm, inputs)
    set_eval(gm)  # a new GraphModule is in training mode; the captured model is in eval mode
    _drop_string_annotations(gm)
    names = [n.name for n in _placeholders(gm)]
    if method == "torch.export" and not fixed_batch:  # named after forward's arguments
        dynamic_axes = _renamed(dynamic_axes, _argument_names(model, len(inputs)), names, inputs)
    axes = {} if method == "torch.export" and fixed_batch else resolve(dynamic_axes, names, inputs)
    return Captured(gm, method, inputs, _specs(names, inputs, axes), notes, axes)


def _specs(names: list[str], inputs: Sequence[torch.Tensor], axes: DynamicAxes) -> list:
    """One InputSpec per input: its shape with the dim name at every dynamic axis."""
    return [
        InputSpec(n, tuple(axes.get(n, {}).get(i, d) for i, d in enumerate(x.shape)), x.dtype)
        for n, x in zip(names, inputs, strict=True)
    ]


def _export_fallback(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    dynamic_axes: Any,
    trace_exc: BaseException,
    where: tuple[str, str],
) -> tuple[Any, str]:
    """:func:`_torch_export` after symbolic tracing failed; both failures in one message."""
    try:
        return _torch_export(model, inputs, dynamic_axes)
    except CaptureError:  # the export ran, but could not keep the axes the user asked for
        raise
    except Exception as export_exc:  # noqa: BLE001
        raise CaptureError(
            _capture_message(trace_exc, where, export_exc, fallback=True)
        ) from trace_exc


def _export_notes(
    gm: fx.GraphModule, trace_exc: BaseException, where: tuple[str, str], fixed_batch: str
) -> list[str]:
    return [
        f"symbolic tracing failed ({first_line(trace_exc)} at {where[0]}); "
        "captured with torch.export instead: module-level passes see aten ops",
        f"torch.export could not keep the batch dynamic ({fixed_batch}); the captured "
        "graph, and what graphopt builds from it, take the example's batch size only"
        if fixed_batch
        else f"torch.export kept the dynamic axes symbolic: {_export_ranges(gm)}",
    ]


def _torch_export(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_axes: Any = None
) -> tuple[Any, str]:
    """``torch.export`` of ``model``: ``(module, why its shapes are fixed, or "")``.

    Without ``dynamic_axes`` the example's shapes: the exported module guards its input shapes,
    so the inputs are declared static and other batch sizes are refused up front, never
    computed wrong. A dynamic batch by default would build padding and views from
    ``sym_size``, which the structural passes do not all read yet (DBB's item-assigned padding
    stays unmerged).

    With ``dynamic_axes`` (the user asked: a transformer's sequence length) every named axis is
    ``Dim.DYNAMIC``: torch.export keeps it symbolic or raises, here a :class:`CaptureError`
    naming the axes, never a silent specialisation. Exported with ``backed_size_oblivious``,
    so that an example size of 1 (a batch of one) is not specialised as torch's 0/1 rule does.
    """
    if dynamic_axes is None:
        with EXPORT_LOCK:
            module = torch.export.export(model, inputs, strict=False).module()
        return module, "torch.export specialises the graph to the example's shapes"
    names = _argument_names(model, len(inputs))
    axes = resolve(dynamic_axes, names, inputs)
    shapes = tuple({a: torch.export.Dim.DYNAMIC for a in axes.get(n, {})} or None for n in names)
    try:
        # torch's own switch (torch 2.13): sizes 0/1 of the example are not specialised
        with EXPORT_LOCK, torch.fx.experimental._config.patch(backed_size_oblivious=True):
            module = torch.export.export(
                model, inputs, dynamic_shapes=shapes, strict=False
            ).module()
    except Exception as exc:  # noqa: BLE001 - a symbolic-trace failure sent us here: say both
        detail = " ".join(str(exc).split("\n")[:3])[:600]
        raise CaptureError(
            f"symbolic tracing failed and torch.export could not keep the dynamic axes "
            f"{describe(axes)} symbolic: {type(exc).__name__}: {detail}. Leave the axis the "
            "model fixes out of dynamic_axes (it is then static, at the example's size)."
        ) from exc
    return module, ""


def _argument_names(model: nn.Module, count: int) -> list[str]:
    """The names of ``forward``'s first ``count`` positional parameters (``input{i}`` for
    those taken by ``*args``): what ``dynamic_axes`` may name before the graph exists."""
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return (params + [f"input{i}" for i in range(len(params), count)])[:count]


def _renamed(
    dynamic_axes: Any, given: list[str], names: list[str], inputs: Sequence[torch.Tensor]
) -> DynamicAxes:
    """``dynamic_axes`` as named after ``forward``'s arguments, keyed by the exported graph's
    placeholder names instead (the same inputs, in order)."""
    axes = resolve(dynamic_axes, given, inputs)
    return {names[given.index(k)]: v for k, v in axes.items()}


def _export_ranges(gm: fx.GraphModule) -> str:
    """``input_ids: [s0, s1]; s0 in [0, inf), s1 in [2, inf)``: the exported inputs' symbolic
    shapes and the ranges torch.export inferred for them (a size outside is refused)."""
    shapes, symbols = [], {}
    for node in _placeholders(gm):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = [str(d) for d in val.shape]
            shapes.append(f"{node.name}: [{', '.join(dims)}]")
            for d in val.shape:
                if isinstance(d, torch.SymInt):
                    symbols[str(d)] = d
    ranges = []
    for name, d in symbols.items():
        vr = d.node.shape_env.var_to_range.get(d.node.expr)
        if vr is not None:
            upper = str(vr.upper).replace("int_oo", "inf")  # sympy's integer infinity
            ranges.append(f"{name} in [{vr.lower}, {upper}]")
    return "; ".join(shapes) + (f" ({', '.join(ranges)})" if ranges else "")


class LeafTracer(fx.Tracer):
    """torch.fx's tracer with extra leaf module types (traced as calls, not traced into)."""

    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = ()) -> None:
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _symbolic_trace(
    model: nn.Module, leaf_modules, concrete_args, inputs: tuple[torch.Tensor, ...] | None
) -> fx.GraphModule:
    bound = bound_defaults(model, len(inputs) if inputs is not None else None, concrete_args)
    tracer = LeafTracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=bound or None)
    drop_bound_placeholders(graph, set(bound))
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _frozen_constants(gm: fx.GraphModule) -> list[str]:
    """Tensors the tracer evaluated once and stored (``torch.randn(4)``, ``torch.arange(n)``)."""
    return [
        n.target
        for n in gm.graph.nodes
        if n.op == "get_attr" and n.target.startswith("_tensor_constant")
    ]


def set_eval(gm: nn.Module) -> nn.Module:
    """``gm.eval()``, also for a ``torch.export`` module, whose ``eval()`` raises (its graph
    was specialised to the mode it was exported in: eval, see :func:`capture`)."""
    try:
        gm.eval()
    except NotImplementedError:
        for m in gm.modules():
            m.training = False
    return gm


def annotate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running ``gm`` once."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def copy_model(model: nn.Module, who: str) -> nn.Module:
    """A deep copy of the user's module, so that nothing graphopt does can change theirs.

    Refuses first what a copy would silently lose or cannot run: forward hooks (capture drops
    them) and parameters on the ``meta`` device (no values).
    """
    _check_module(model)
    try:
        # outside inference mode: a copy made under torch.inference_mode() would hold inference
        # tensors, which no later backward (finetune=, training the returned graph) accepts
        with torch.inference_mode(False):
            return copy.deepcopy(model)
    except Exception as exc:
        raise CaptureError(
            f"could not copy the model ({type(exc).__name__}: {exc}); {who} on a copy so that "
            "your model is never changed. Make the module deep-copyable (no open files or "
            "locks as attributes)."
        ) from exc


def _check_module(model: nn.Module) -> None:
    hooks = []
    for name, m in model.named_modules():
        for kind, table in (
            ("forward pre-hook", m._forward_pre_hooks),
            ("forward hook", m._forward_hooks),
        ):
            hooks += [
                f"{kind} {_callable_label(fn)} on {name or 'the model'}" for fn in table.values()
            ]
    glob = torch.nn.modules.module
    for kind, table in (
        ("global forward pre-hook", glob._global_forward_pre_hooks),
        ("global forward hook", glob._global_forward_hooks),
    ):
        hooks += [f"{kind} {_callable_label(fn)}" for fn in table.values()]
    if hooks:
        shown = "; ".join(hooks[:4]) + (f"; and {len(hooks) - 4} more" if len(hooks) > 4 else "")
        raise CaptureError(
            f"the model has {len(hooks)} forward hook(s) ({shown}); a captured graph runs "
            "forward() only, so their effect would be lost. Remove them (handle.remove()) "
            "before optimizing, or move what they do into forward()."
        )
    meta = [
        name
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.device.type == "meta"
    ]
    if meta:
        raise CaptureError(
            f"{len(meta)} parameter(s)/buffer(s) of the model are on the 'meta' device (no "
            f"values), e.g. {meta[0]!r}; load real weights first (model.to_empty(device='cpu') "
            "then load_state_dict(...))."
        )


def _callable_label(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def failing_line(exc: BaseException) -> tuple[str, str]:
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
        f"  tracing error: {first_line(trace_exc)}",
    ]
    if fallback and export_exc is not None:
        lines.append(
            f"  torch.export fallback also failed: {type(export_exc).__name__}: "
            f"{first_line(export_exc)}"
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


def _capture_onnx(model: Any, example_inputs: Sequence[Any] | None, dynamic_axes: Any) -> Captured:

    if (
        isinstance(model, str | os.PathLike)
        and not str(model).endswith(".onnx")
        and not Path(model).exists()
    ):
        raise CaptureError(f"{model!r} is neither an existing .onnx file nor a zoo model name.")
    gm = set_eval(import_onnx(model))  # ONNX graphs are inference graphs
    placeholders = _placeholders(gm)
    if example_inputs is None:
        inputs = tuple(_example_for(n) for n in placeholders)
        notes = [
            "ONNX model imported; example inputs generated from its declared input shapes "
            "(batch dimensions set to 1)"
        ]
    else:
        inputs = as_tensors(example_inputs)
        notes = ["ONNX model imported"]
    if len(inputs) != len(placeholders):
        raise InputError(
            f"the ONNX model takes {len(placeholders)} inputs "
            f"({', '.join(n.name for n in placeholders)}); got {len(inputs)}."
        )
    try:
        check_runs(gm, inputs)
    except InputError as exc:
        if exc.__cause__ is None or not _runs_in_onnxruntime(model, inputs):
            raise
        # inputs of the declared shapes and dtypes: the imported graph, not the user, is wrong
        raise CaptureError(
            "the imported ONNX graph failed on inputs of the shapes and dtypes the model "
            f"declares: {type(exc.__cause__).__name__}: {first_line(exc.__cause__)}. The "
            "import is at fault (an op graphopt translates wrongly); please report it with the "
            "model."
        ) from exc.__cause__
    annotate_shapes(gm, inputs)
    names = list(gm.meta["onnx_input_names"])
    if dynamic_axes is None:  # every dimension the file declares symbolic stays so
        dynamic_axes = {
            name: declared_axes(n, x.dim())
            for name, n, x in zip(names, placeholders, inputs, strict=True)
        }
    axes = resolve(dynamic_axes, names, inputs)
    specs = _specs(
        [n.name for n in placeholders],
        inputs,
        {n.name: axes.get(name, {}) for name, n in zip(names, placeholders, strict=True)},
    )
    return Captured(gm, "onnx", inputs, specs, notes, axes)


def declared_axes(node: fx.Node, rank: int) -> dict[int, str]:
    """The symbolic axes an ONNX input declares, ``{axis: dim_param}``; an unnamed one, or one
    named ``?`` as PaddlePaddle's exporter names every unknown dim, is ``<input>_dim<axis>``
    (a shared name means a shared size). No shape declared: the batch, axis 0."""
    declared = node.meta.get("onnx_shape")
    if not declared or len(declared) != rank:  # no shape declared: the batch, as for a module
        return {0: "batch"} if rank else {}
    name = node.meta.get("onnx_name", node.name)
    return {
        i: d if isinstance(d, str) and d.isidentifier() else f"{name}_dim{i}"
        for i, d in enumerate(declared)
        if not (isinstance(d, int) and d > 0)
    }


def _runs_in_onnxruntime(model: Any, inputs: Sequence[torch.Tensor]) -> bool:
    """ONNX Runtime runs the user's ONNX model on ``inputs``: where the imported graph fails on
    them, the import is at fault, not the inputs."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(
            load_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in session.get_inputs()]
        session.run(None, {n: to_numpy(x) for n, x in zip(names, inputs, strict=True)})
    except Exception:  # noqa: BLE001 - ONNX Runtime fails too: the inputs (or model) are wrong
        return False
    return True


def _example_for(node: fx.Node) -> torch.Tensor:
    """An example input of the shape an ONNX input declares: a symbolic batch dimension (axis 0,
    or a dim named like a batch) is 1; any other symbolic dimension has no size to guess."""
    shape = node.meta.get("onnx_shape")
    dtype = node.meta.get("onnx_dtype", torch.float32)
    if shape is None:
        raise InputError(f"ONNX input {node.name!r} has no declared shape; pass example_inputs.")
    unknown = [
        f"axis {i} ({d!r})" if isinstance(d, str) and d else f"axis {i}"
        for i, d in enumerate(shape)
        if not (isinstance(d, int) and d > 0) and not _batch_like(i, d)
    ]
    if unknown:
        raise InputError(
            f"ONNX input {node.meta.get('onnx_name', node.name)!r} has symbolic dimensions "
            f"{', '.join(unknown)} of no declared size: give example inputs of a typical size "
            "(example_inputs=... in Python, --input-shape NAME:1x3x224x224 on the command "
            "line); they stay dynamic in the artifact, verified at that size and at twice it."
        )
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(dims, generator=gen).to(dtype)
    return torch.randint(0, 2, dims, generator=gen).to(dtype)


def _batch_like(axis: int, dim: Any) -> bool:
    name = dim.lower() if isinstance(dim, str) else ""
    return axis == 0 or "batch" in name or name in ("n", "b", "bs")


def _drop_string_annotations(gm: fx.GraphModule) -> None:
    """Forget type annotations that are strings (``x: torch.Tensor`` in a module written with
    ``from __future__ import annotations``): FX keeps them as the type of a placeholder, and a
    GraphModule holding one cannot be saved (``torch.save``'s importer wants a ``__name__``), so
    a reproducer could not save the graph."""
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type, changed = None, True
    if changed:
        gm.recompile()

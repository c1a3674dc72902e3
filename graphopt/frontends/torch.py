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
"""

from __future__ import annotations

import copy
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
from graphopt.core.numerics import flatten_outputs
from graphopt.errors import CaptureError, InputError
from graphopt.frontends.bind import bound_defaults, drop_bound_placeholders
from graphopt.frontends.onnx import from_numpy, import_onnx, load_onnx

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
        try:
            gm, fixed_batch = _torch_export(model, inputs)
            method = "torch.export"
        except Exception as export_exc:  # noqa: BLE001
            raise CaptureError(
                _capture_message(trace_exc, where, export_exc, fallback=True)
            ) from trace_exc
        notes.append(
            f"symbolic tracing failed ({first_line(trace_exc)} at {where[0]}); "
            "captured with torch.export instead: module-level passes see aten ops"
        )
        if fixed_batch:
            notes.append(
                f"torch.export could not keep the batch dynamic ({fixed_batch}); the captured "
                "graph, and what graphopt builds from it, take the example's batch size only"
            )
        log.info("capture fell back to torch.export: %s", first_line(trace_exc))
    if inputs is None:
        raise InputError(
            "example_inputs are needed to record shapes and to verify each pass; "
            "pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)."
        )
    annotate_shapes(gm, inputs)
    set_eval(gm)  # a new GraphModule is in training mode; the captured model is in eval mode
    static = method == "torch.export" and bool(fixed_batch)
    specs = [
        InputSpec(
            n.name, tuple(t.shape) if static or not t.dim() else (None, *t.shape[1:]), t.dtype
        )
        for n, t in zip(_placeholders(gm), inputs, strict=False)
    ]
    return Captured(gm, method, inputs, specs, notes)


def _torch_export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, str]:
    """``torch.export`` of ``model`` at the example's shapes: ``(module, why the batch is
    fixed)``. The exported module guards its input shapes, so the inputs are declared static
    and other batch sizes are refused up front, never computed wrong.

    A dynamic batch (``Dim`` on axis 0) exports too, but its graphs build padding and views from
    ``sym_size``, which the structural passes do not all read yet (DBB's item-assigned padding
    stays unmerged): static until they do.
    """

    with EXPORT_LOCK:
        module = torch.export.export(model, inputs, strict=False).module()
    return module, "torch.export specialises the graph to the example's shapes"


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


def as_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple of tensors; an InputError saying what to pass otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, list | tuple):
        raise InputError(
            f"example_inputs must be a tuple of tensors, e.g. (x,); got "
            f"{type(example_inputs).__name__}."
        )
    out = []
    for i, x in enumerate(example_inputs):
        # copies: graphopt runs models many times and never on the caller's own tensors
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                raise InputError(
                    f"example input {i} is on the 'meta' device and holds no values; pass "
                    "a real tensor."
                )
            out.append(_clone(x.detach().cpu()))
        elif type(x).__module__ == "numpy":
            out.append(from_numpy(x))  # a copy; ml_dtypes' bfloat16/float8 too
        else:
            raise InputError(
                f"example input {i} is a {type(x).__name__}; graphopt takes "
                "torch tensors or numpy arrays."
            )
    return tuple(out)


def _clone(t: torch.Tensor) -> torch.Tensor:
    # an inference tensor (made under torch.inference_mode()) cloned outside inference mode is
    # a normal tensor, which every later step (tracing, passes, autograd in fine-tuning) takes
    with torch.inference_mode(False):
        return t.clone()


def check_example_inputs(inputs: Sequence[torch.Tensor]) -> None:
    """Refuse example inputs that cannot tell a right graph from a wrong one.

    Empty tensors (batch 0) compare nothing; NaN/inf make every comparison meaningless.
    """
    for i, x in enumerate(inputs):
        if x.dim() > 0 and x.numel() == 0:
            raise InputError(
                f"example input {i} is empty (shape {tuple(x.shape)}): checks on it compare "
                "nothing. Pass at least one sample, e.g. batch size 1."
            )
        if x.is_floating_point() or x.is_complex():
            # float8 is storage only in torch: isfinite works on its float32 values
            finite = torch.isfinite(x.float() if x.element_size() == 1 else x)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise InputError(
                    f"example input {i} holds {bad} NaN/inf value(s): checks on it would "
                    "compare NaN with NaN. Pass finite, representative inputs."
                )


def is_constant(x: torch.Tensor) -> bool:
    """Every element equal (all zeros, all ones...): such an input hides most rewrite bugs."""
    if x.numel() <= 1:
        return False
    flat = x.reshape(-1)
    return bool((flat == flat[0]).all())


def discriminating_inputs(inputs: Sequence[torch.Tensor], seed: int = 0) -> tuple | None:
    """A second sample where some floating input is constant: each constant floating input
    replaced by seeded random values of its shape and dtype (``None`` when none is constant)."""
    if not any(x.is_floating_point() and is_constant(x) for x in inputs):
        return None
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
        if x.is_floating_point() and is_constant(x)
        else x.clone()
        for x in inputs
    )


def check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run ``model`` once on copies of ``inputs``: it must run, return tensors and leave its
    inputs alone (a model that updates its input in place cannot be captured faithfully:
    tracing turns ``x += 1`` on an input into an out-of-place add)."""
    check_example_inputs(inputs)
    copies = tuple(_clone(x) for x in inputs)
    state = _state(model)
    try:
        with torch.no_grad():
            out = model(*copies)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
        raise InputError(
            f"the model raised on the example inputs ({shapes}): "
            f"{type(exc).__name__}: {first_line(exc)}. Pass inputs of the shape "
            "and dtype the model expects."
        ) from exc

    if not flatten_outputs(out):
        raise CaptureError(
            f"the model returned {_describe_value(out)}, not tensors; graphopt optimizes "
            "models whose forward() returns a tensor or a tuple/list/dict of tensors."
        )
    if updated := [name for name, t in _state(model).items() if not _same(state[name], t)]:
        shown = ", ".join(updated[:3]) + (
            f" and {len(updated) - 3} more" if len(updated) > 3 else ""
        )
        raise CaptureError(
            f"the model changes its own state in forward() ({shown} differ after one call); an "
            "optimized artifact is a pure function of its inputs and cannot carry such updates "
            "(a running average, a step counter, a cache). Optimize a module whose forward "
            "leaves its parameters and buffers alone, and update the state outside it."
        )
    changed = [
        i for i, (x, c) in enumerate(zip(inputs, copies, strict=True)) if not torch.equal(x, c)
    ]
    if not changed and (probe := discriminating_inputs(inputs)) is not None:
        # `x.mul_(2)` leaves an all-zero input as it was: look again on random values
        copies = tuple(_clone(x) for x in probe)
        try:
            with torch.no_grad():
                model(*copies)
        except Exception:  # noqa: BLE001 - the random probe is ours; the user's inputs ran
            copies = probe
        changed = [
            i for i, (x, c) in enumerate(zip(probe, copies, strict=True)) if not torch.equal(x, c)
        ]
    if changed:
        raise CaptureError(
            f"the model updates its input(s) {', '.join(map(str, changed))} in place (e.g. "
            "`x += 1` or `x.mul_(2)` on an argument of forward()); a captured graph cannot "
            "reproduce that effect on the caller's tensor. Work on a copy in forward() "
            "(`x = x + 1`, `x = x.mul(2)`)."
        )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, by name."""
    with torch.inference_mode(False):
        return {
            name: t.detach().clone()
            for name, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return bool(torch.equal(a, b))


def _describe_value(out: Any) -> str:
    if out is None:
        return "None"
    if isinstance(out, int | float | bool | str):
        return f"a {type(out).__name__} ({out!r})"
    return f"a {type(out).__name__} holding no tensor"


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


def _capture_onnx(model: Any, example_inputs: Sequence[Any] | None) -> Captured:

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
            "(symbolic dimensions set to 1)"
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
    specs = []
    for n, t in zip(placeholders, inputs, strict=True):
        declared = n.meta.get("onnx_shape")
        if declared is not None and len(declared) == t.dim():
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in declared)
        else:
            shape = (None, *t.shape[1:]) if t.dim() else ()
        specs.append(InputSpec(n.name, shape, t.dtype))
    return Captured(gm, "onnx", inputs, specs, notes)


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
    shape = node.meta.get("onnx_shape")
    dtype = node.meta.get("onnx_dtype", torch.float32)
    if shape is None:
        raise InputError(f"ONNX input {node.name!r} has no declared shape; pass example_inputs.")
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(dims, generator=gen).to(dtype)
    return torch.randint(0, 2, dims, generator=gen).to(dtype)

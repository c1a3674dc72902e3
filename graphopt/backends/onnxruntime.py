"""ONNX Runtime backend: FX -> ONNX -> ``InferenceSession``; run, save, measure.

Export uses torch's TorchScript-based exporter (``dynamo=False``): on the zoo models it is ~15x
faster than the dynamo exporter (0.15 s against 2.5 s on a small CNN here), handles FX graphs
with arbitrary ``call_function`` nodes, and keeps the batch dimension dynamic through
``dynamic_axes``. Where it fails the dynamo exporter (``onnxscript``) is tried. One export runs
at a time in a process (``EXPORT_LOCK``: ``torch.onnx.export`` is not thread-safe). The export
keeps the model's interface: every input by name, count and order (also one no node reads), one
output per output tensor (``output_names``), and integer inputs that feed a shape stay inputs.
A valid model whose batch cannot stay dynamic is compiled with the example's batch, and
``OrtArtifact.static_batch_reason`` says why. Sessions use full graph
optimization, sequential execution and one intra-op thread per available core by default;
``OnnxRuntimeBackend.select_settings`` times a few alternatives against each other and
``with_settings`` applies the winner.

A mobile target (``android-arm64``, ``aarch64``, ``llvm -mtriple=aarch64...``) is served for
verification: sessions run on this machine's CPU provider so the numbers can be checked, the
artifact saves in ORT format for the phone (``.ort``, see :mod:`graphopt.backends.ort_mobile`),
and ``measure`` refuses, since a phone's latency cannot be measured from here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from graphopt import verify
from graphopt._util import close_matches, first_line
from graphopt.backends.measure import (
    Latency,
    LatencyCache,
    available_cores,
    cache_key,
    cached_latency,
    time_callable,
    time_interleaved,
)
from graphopt.errors import BackendError, InputError
from graphopt.target import Target

log = logging.getLogger(__name__)

OPSET = 17
MAX_IR_VERSION = 10  # ONNX Runtime 1.31 rejects IR 14, which onnx 1.23 stamps by default

_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

_OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_EXEC_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
SETTING_NAMES = ("threads", "optimization_level", "execution_mode", "inter_op_threads")


# torch.onnx.export is not thread-safe (both exporters keep global state: the TorchScript
# exporter's GLOBALS, the dynamo exporter's registries): concurrent optimize() calls in threads
# failed inside it, 4 of 6. Every export in this process holds this lock.
EXPORT_LOCK = threading.RLock()
# ORT's uint8 x int8 kernels on x86 without VNNI (SSE4.1, AVX2, AVX-512F) sum each pair of
# products in saturating int16 (PMADDUBSW: 255 * 127 * 2 = 64770 is clamped to 32767), so the
# fused int8 model is far from its QDQ function on such CPUs. This session entry makes ORT
# shift the int8 weights to uint8 and run its exact uint8 x uint8 kernels there; elsewhere
# (VNNI, AMX, ARM) it does nothing. Set on every session (float models have no such kernel).
EXACT_INT8_CONFIG = ("session.x64quantprecision", "1")


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Export ``module`` to an ONNX ``ModelProto`` with (by default) a dynamic batch axis.

    The model's interface is kept: one graph input per example input, named ``input_names``
    (default ``input0``...) in their order, even an input that no node reads (the TorchScript
    exporter drops those), and one graph output per output tensor, named ``output_names``
    (default ``output0``...). Integer inputs that feed a shape (``Reshape``, ``Expand``,
    ``ConstantOfShape``, ``Slice`` of an imported ONNX model) stay runtime inputs: they are not
    frozen into the example's values.

    Exports are serialized by a process-wide lock (``torch.onnx.export`` is not thread-safe).
    The TorchScript exporter is tried first, then the dynamo exporter (``onnxscript``).
    """
    inputs = tuple(example_inputs)
    if input_names is not None and len(input_names) != len(inputs):
        raise BackendError(
            f"{len(input_names)} input name(s) for {len(inputs)} example input(s): give one "
            "name per input, in order."
        )
    names = _interface_names(input_names, "input", len(inputs))
    # on copies: a model that writes to its inputs must not touch the caller's tensors
    with torch.no_grad():
        outputs = verify.flatten_outputs(module(*_copies(inputs)))
    if output_names is not None and len(output_names) != len(outputs):
        raise BackendError(
            f"{len(output_names)} output name(s) for the {len(outputs)} output tensor(s) the "
            "model returns: give one name per output, in order (or none for output0...)."
        )
    out_names = _interface_names(output_names, "output", len(outputs))
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n, t in zip(names, inputs, strict=True) if t.dim() > 0}
        dynamic_axes.update(
            {n: {0: "batch"} for n, t in zip(out_names, outputs, strict=True) if t.dim() > 0}
        )
    with EXPORT_LOCK, _exportable(module) as exportable:
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.no_grad(), _AttentionForExport():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    exportable,
                    _copies(inputs),
                    buffer,
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    output_names=out_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
            proto = onnx.load_from_string(buffer.getvalue())
        except Exception as legacy_exc:  # noqa: BLE001 - fall back on the other exporter
            log.info("TorchScript exporter failed (%s); trying the dynamo exporter", legacy_exc)
            proto = _export_dynamo(
                module, _copies(inputs), names, out_names, dynamic_batch, opset, legacy_exc
            )
    _keep_interface(proto, names, inputs, out_names, dynamic_batch)
    _explicit_same_pads(proto)
    _positive_perms(proto)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


def _copies(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def _export_dynamo(module, inputs, names, out_names, dynamic_batch, opset, legacy_exc):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                opset_version=max(opset, 18),
                input_names=list(names),
                output_names=list(out_names),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        return program.model_proto
    except Exception as exc:
        hint = (
            " Install onnxscript (a dependency of graphopt) for the dynamo exporter."
            if isinstance(exc, ImportError)
            else ""
        )
        raise BackendError(
            f"could not export the graph to ONNX: the TorchScript exporter said "
            f"{first_line(legacy_exc, with_type=True)}; the "
            f"dynamo exporter said {first_line(exc, with_type=True)}.{hint}"
        ) from exc


@contextlib.contextmanager
def _exportable(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` as the TorchScript exporter can take it.

    * A module from ``torch.export``'s ``ExportedProgram.module()`` refuses ``train()`` and
      ``eval()`` (NotImplementedError), which the exporter calls to set eval mode: its graph
      has no mode left to set, so both become no-ops for the export.
    * The ONNX importer's runtime-shape helpers (``Reshape``/``Expand``/``ConstantOfShape``/
      ``Slice`` whose shape is a runtime tensor) read the shape with ``tolist()``, which tracing
      freezes to the example's values: in a copy of the graph they become functions that export
      as the ONNX op itself, with the shape tensor kept as its input.
    """
    patched = {m: (m.train, m.eval) for m in module.modules() if _refuses_train(m)}
    for m in patched:
        m.train = types.MethodType(lambda self, mode=True: self, m)
        m.eval = types.MethodType(lambda self: self, m)
    try:
        yield _with_shape_ops(module)
    finally:
        for m, (train, evaluate) in patched.items():  # torch.export's own refusal again
            m.train, m.eval = train, evaluate


class _AttentionForExport(torch.overrides.TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as the TorchScript exporter can take it.

    Its ONNX symbolic refuses ``enable_gqa=True`` (grouped-query attention: fewer key/value
    heads than query heads); the exporter then fell back on the dynamo exporter, ~30x slower.
    Here each key/value head is repeated for its group of query heads first, which is what
    ``enable_gqa`` means:  k' = repeat_interleave(k, Hq / Hkv, dim=-3), the same for v.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", "") == "scaled_dot_product_attention" and kwargs.get(
            "enable_gqa"
        ):
            query, key, value = args[:3]
            groups = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(groups, dim=-3)
            value = value.repeat_interleave(groups, dim=-3)
            kwargs["enable_gqa"] = False
            return func(query, key, value, *args[3:], **kwargs)
        return func(*args, **kwargs)


def _refuses_train(module: torch.nn.Module) -> bool:
    # ExportedProgram.module() sets train/eval on the instance to functions that raise
    train = module.__dict__.get("train")
    return train is not None and getattr(train, "__name__", "") == "_train"


# --------------------------------------------------------------------------- runtime shapes


def _int64(g: Any, value: Any) -> Any:
    return g.op("Cast", value, to_i=onnx.TensorProto.INT64)


class _ReshapeOp(torch.autograd.Function):
    """ONNX ``Reshape(x, shape)`` with ``shape`` a runtime tensor (traced as the op itself)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: torch.Tensor, allowzero: int) -> torch.Tensor:
        dims = [int(d) for d in shape.tolist()]
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims).clone()

    @staticmethod
    def symbolic(g: Any, x: Any, shape: Any, allowzero: int) -> Any:
        if allowzero:
            return g.op("Reshape", x, _int64(g, shape), allowzero_i=1)
        return g.op("Reshape", x, _int64(g, shape))


class _ExpandOp(torch.autograd.Function):
    """ONNX ``Expand(x, shape)`` (bidirectional broadcast) with a runtime ``shape``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = tuple(int(d) for d in shape.tolist())
        return x.expand(torch.broadcast_shapes(x.shape, dims)).clone()

    @staticmethod
    def symbolic(g: Any, x: Any, shape: Any) -> Any:
        return g.op("Expand", x, _int64(g, shape))


class _ConstantOfShapeOp(torch.autograd.Function):
    """ONNX ``ConstantOfShape(shape)`` with a runtime ``shape``, filled with ``value``."""

    @staticmethod
    def forward(ctx: Any, shape: torch.Tensor, value: float, dtype: str) -> torch.Tensor:
        return torch.full([int(d) for d in shape.tolist()], value, dtype=getattr(torch, dtype))

    @staticmethod
    def symbolic(g: Any, shape: Any, value: float, dtype: str) -> Any:
        fill = torch.tensor([value], dtype=getattr(torch, dtype))
        return g.op("ConstantOfShape", _int64(g, shape), value_t=fill)


class _SliceOp(torch.autograd.Function):
    """ONNX ``Slice(x, starts, ends, axes, steps)`` with runtime ``starts`` / ``ends``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        axes: torch.Tensor,
        steps: torch.Tensor,
    ) -> torch.Tensor:
        y = x
        for s, e, a, st in zip(
            starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist(), strict=True
        ):
            # Python's slice clamps as ONNX Slice does, negative steps included
            axis = int(a) % x.dim()
            picked = range(*slice(int(s), int(e), int(st)).indices(x.shape[axis]))
            y = torch.index_select(y, axis, torch.tensor(list(picked), dtype=torch.int64))
        return y

    @staticmethod
    def symbolic(g: Any, x: Any, starts: Any, ends: Any, axes: Any, steps: Any) -> Any:
        return g.op(
            "Slice", x, _int64(g, starts), _int64(g, ends), _int64(g, axes), _int64(g, steps)
        )


class _RangeOp(torch.autograd.Function):
    """ONNX ``Range(start, limit, delta)`` with bounds known only at run time (0-D tensors)."""

    @staticmethod
    def forward(
        ctx: Any, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)

    @staticmethod
    def symbolic(g: Any, start: Any, limit: Any, delta: Any) -> Any:
        return g.op("Range", start, limit, delta)


def _index_tensor(v: Any) -> torch.Tensor:
    """Slice arguments as a 1-D int64 tensor: a tensor, or a list of ints and 0-D tensors."""
    if isinstance(v, torch.Tensor):
        return v.reshape(-1).to(torch.int64)
    return torch.cat([torch.as_tensor(d, dtype=torch.int64).reshape(1) for d in v])


def _has_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (
        isinstance(v, list | tuple) and any(isinstance(d, torch.Tensor) for d in v)
    )


def _reshape_twin(original: Callable[..., Any], x: Any, shape: Any, allowzero: int = 0) -> Any:
    if not isinstance(shape, torch.Tensor):
        return original(x, shape, allowzero)
    return _ReshapeOp.apply(x, shape, int(allowzero))


def _expand_twin(original: Callable[..., Any], x: Any, shape: Any) -> Any:
    if not isinstance(shape, torch.Tensor):
        return original(x, shape)
    return _ExpandOp.apply(x, shape)


def _full_twin(original: Callable[..., Any], shape: Any, value: Any, dtype: torch.dtype) -> Any:
    if not isinstance(shape, torch.Tensor) or not isinstance(value, int | float | bool):
        return original(shape, value, dtype)
    return _ConstantOfShapeOp.apply(shape, value, str(dtype).removeprefix("torch."))


def _slice_twin(
    original: Callable[..., Any],
    x: Any,
    starts: Any,
    ends: Any,
    axes: Any = None,
    steps: Any = None,
) -> Any:
    if not any(_has_tensor(v) for v in (starts, ends, axes, steps)):
        return original(x, starts, ends, axes, steps)
    starts, ends = _index_tensor(starts), _index_tensor(ends)
    count = int(starts.shape[0])
    # ONNX's defaults: every axis from 0 in order, step 1
    axes = torch.arange(count) if axes is None else _index_tensor(axes)
    steps = torch.ones(count, dtype=torch.int64) if steps is None else _index_tensor(steps)
    return _SliceOp.apply(x, starts, ends, axes, steps)


def _range_twin(
    original: Callable[..., Any], start: Any, limit: Any, delta: Any, dtype: torch.dtype
) -> Any:
    if not any(isinstance(v, torch.Tensor) for v in (start, limit, delta)):
        return original(start, limit, delta, dtype)
    # ONNX Runtime's Range has float, double, int16/32/64 kernels: others go through one
    wide = torch.float32 if dtype.is_floating_point and dtype != torch.float64 else dtype
    wide = torch.int64 if not dtype.is_floating_point and dtype not in _RANGE_INTS else wide
    bounds = [torch.as_tensor(v).reshape(()).to(wide) for v in (start, limit, delta)]
    return _RangeOp.apply(*bounds).to(dtype)


_RANGE_INTS = (torch.int16, torch.int32, torch.int64)


def _shape_op_table() -> dict[Any, Callable[..., torch.Tensor]]:
    """The ONNX importer's runtime-shape helpers -> twins that export as the ONNX op."""
    from graphopt import onnx_import

    twins = {
        "_reshape_dynamic": _reshape_twin,
        "_expand_dynamic": _expand_twin,
        "_full_dynamic": _full_twin,
        "_slice_dynamic": _slice_twin,
        "_slice_onnx": _slice_twin,
        "_range_dynamic": _range_twin,
    }
    table = {}
    for name, twin in twins.items():
        if (original := getattr(onnx_import, name, None)) is not None:
            table[original] = functools.update_wrapper(functools.partial(twin, original), twin)
    return table


def _with_shape_ops(module: torch.nn.Module) -> torch.nn.Module:
    """``module``, or a GraphModule over a copy of its graph whose runtime-shape helpers are
    replaced by their exportable twins (parameters shared, nothing of ``module`` changes)."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    table = _shape_op_table()
    if not any(n.op == "call_function" and n.target in table for n in module.graph.nodes):
        return module
    graph = copy.deepcopy(module.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
    twin = torch.fx.GraphModule(module, graph)
    twin.train(module.training)
    return twin


# --------------------------------------------------------------------------- interface


_ONNX_DTYPES = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float64: onnx.TensorProto.DOUBLE,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
    torch.int64: onnx.TensorProto.INT64,
    torch.int32: onnx.TensorProto.INT32,
    torch.int16: onnx.TensorProto.INT16,
    torch.int8: onnx.TensorProto.INT8,
    torch.uint8: onnx.TensorProto.UINT8,
    torch.bool: onnx.TensorProto.BOOL,
}


def _keep_interface(
    proto: onnx.ModelProto,
    names: list[str],
    inputs: tuple[torch.Tensor, ...],
    out_names: list[str],
    dynamic_batch: bool,
) -> None:
    """Give ``proto`` the model's inputs, by name, count and order: the TorchScript exporter
    drops an input no node reads (a runtime then gets more feeds than inputs). Its outputs must
    be the model's, one per output tensor, named ``out_names``."""
    graph = proto.graph
    present = {}
    for vi in graph.input:
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(vi)
        present[vi.name] = kept
    if [vi.name for vi in graph.input[: len(names)]] != names:
        wanted = set(names)
        ordered = [
            present.get(n) or _value_info(n, x, dynamic_batch)
            for n, x in zip(names, inputs, strict=True)
        ]
        rest = [vi for name, vi in present.items() if name not in wanted]  # listed weights
        del graph.input[:]
        graph.input.extend(ordered + rest)
    got = [o.name for o in graph.output]
    if got != out_names:
        raise BackendError(
            f"the ONNX export has outputs {got}, not the model's {out_names}: the exporter "
            "merged or dropped an output. Return each output tensor once."
        )


def _value_info(name: str, x: torch.Tensor, dynamic_batch: bool) -> onnx.ValueInfoProto:
    if x.dtype not in _ONNX_DTYPES:
        raise BackendError(f"input {name!r} has dtype {x.dtype}, which ONNX export cannot declare.")
    dims: list[Any] = list(x.shape)
    if dynamic_batch and dims:
        dims[0] = "batch"
    return onnx.helper.make_tensor_value_info(name, _ONNX_DTYPES[x.dtype], dims)


def _positive_perms(proto: onnx.ModelProto) -> None:
    """``Transpose`` perms with negative axes made positive (axis % rank).

    The TorchScript exporter writes ``movedim(axis, -1)``'s -1 into the perm as it is; ONNX
    wants axes in [0, rank) and ONNX Runtime refuses the model ("Invalid attribute perm").
    """
    for node in proto.graph.node:
        if node.op_type != "Transpose":
            continue
        for attr in node.attribute:
            if attr.name == "perm" and any(p < 0 for p in attr.ints):
                rank = len(attr.ints)
                fixed = [p % rank for p in attr.ints]
                del attr.ints[:]
                attr.ints.extend(fixed)


def _explicit_same_pads(proto: onnx.ModelProto) -> None:
    """Stride-1 ``Conv`` with ``auto_pad=SAME_*`` and a dilation gets explicit ``pads``.

    ``padding='same'`` exports as ``auto_pad``, which ONNX Runtime's Conv refuses with a
    dilation ("Dilation not supported for AutoPadType::SAME_UPPER"). With stride 1 the padding
    does not depend on the input size: total_i = dilation_i * (kernel_i - 1), the odd one at
    the end for SAME_UPPER (torch's ``same``) and at the start for SAME_LOWER.
    """
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        if "kernel_shape" in attrs:
            kernel = list(attrs["kernel_shape"].ints)
        elif len(node.input) > 1 and node.input[1] in weights:
            kernel = weights[node.input[1]][2:]
        else:  # kernel size unknown here: leave it to the runtime
            continue
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * len(kernel)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(kernel)
        # without a dilation ONNX Runtime takes auto_pad; with a stride the pads depend on size
        if all(d == 1 for d in dilations) or any(s != 1 for s in strides):
            continue
        totals = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
        small = [t // 2 for t in totals]
        large = [t - t // 2 for t in totals]
        begin, end = (small, large) if mode == "SAME_UPPER" else (large, small)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("pads", begin + end))


def _runs_on(
    artifact: OrtArtifact, example_inputs: Sequence[torch.Tensor], shapes: list[tuple[int, ...]]
) -> None:
    """Run ``artifact`` once on the example: a lowering that cannot run its own example (ONNX
    Runtime refusing a kernel's attributes for a dynamic shape, say), or that gives outputs of
    other shapes than the model's ``shapes`` (an exporter that froze a runtime value into a
    constant), is no lowering: ``BackendError``."""
    try:
        arrays = [to_numpy(x) for x in example_inputs]
    except (TypeError, InputError):  # a dtype numpy cannot hold: the end-to-end check runs it
        return
    got = [tuple(np.shape(out)) for out in artifact.run(arrays)]
    if got != shapes:
        raise BackendError(
            f"the ONNX export gives outputs of shapes {got} on the example, the model "
            f"{shapes}: the exporter froze or dropped part of the computation."
        )


def _output_shapes(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[Any]:
    with torch.no_grad():
        outputs = verify.flatten_outputs(module(*_copies(tuple(inputs))))
    return [tuple(t.shape) for t in outputs]


def _fixed_batch_inputs(proto: onnx.ModelProto, inputs: Sequence[torch.Tensor]) -> list[str]:
    """The graph inputs whose batch axis (dim 0) is a number although it was asked dynamic."""
    fixed = []
    for vi, x in zip(proto.graph.input, inputs, strict=False):
        dims = vi.type.tensor_type.shape.dim
        if x.dim() > 0 and dims and dims[0].HasField("dim_value"):
            fixed.append(vi.name)
    return fixed


def _as_clause(exc: Exception) -> str:
    """The first line of ``exc``'s message to go mid-sentence: no final period, lower case."""
    text = first_line(exc).rstrip(". ")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text  # not "oNNX"


def _interface_names(given: Sequence[str] | None, prefix: str, count: int) -> list[str]:
    """The graph's input or output names: ``given`` as they are (an ONNX model's own names,
    ``data:0`` or ``input.1`` included, so that a caller feeding by name finds them), with
    ``<prefix><i>`` for a missing one."""
    names = [
        str(given[i]) if given is not None and given[i] else f"{prefix}{i}" for i in range(count)
    ]
    if len(set(names)) != len(names):
        raise BackendError(
            f"the {prefix} names {names} repeat a name: an ONNX graph needs one name per {prefix}."
        )
    return names


@dataclass
class OrtArtifact:
    """An ONNX model with its session: callable on numpy arrays, savable.

    ``target``: where the model is meant to run; for a mobile target the session here only
    checks numbers, and ``save`` writes ORT format for a ``.ort`` path.
    """

    proto: onnx.ModelProto
    session: ort.InferenceSession
    target: Target | None = None
    mobile_package: Any = None  # set by save("*.ort"): a MobilePackage
    # why the batch axis is static although a dynamic one was asked for (None: it is dynamic,
    # or was never asked for): the dynamic-batch export or load failed, this says how
    static_batch_reason: str | None = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        metas = self.session.get_inputs()
        if len(arrays) != len(metas):
            raise InputError(
                f"the model takes {len(metas)} input(s) ({', '.join(m.name for m in metas)}), "
                f"but {len(arrays)} were given: pass one array per input, in that order."
            )
        feeds = {}
        for meta, array in zip(self.session.get_inputs(), arrays, strict=True):
            dtype = _NP_DTYPES.get(meta.type)
            # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
            feeds[meta.name] = np.asarray(array, dtype=dtype, order="C")
        try:
            return self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime failed to run the model: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the model: ORT format for a ``.ort`` path, ONNX otherwise.

        The ORT file gets its operator config and XNNPACK session file beside it; the
        :class:`~graphopt.backends.ort_mobile.MobilePackage` is kept as ``mobile_package`` (its
        ``describe()`` lists the operators a reduced mobile build must include); use
        :func:`graphopt.backends.ort_mobile.save_ort_format` for the converter's options.
        """
        path = Path(path)
        if path.suffix.lower() == ".ort":
            from graphopt.backends.ort_mobile import save_ort_format

            mobile = self.target is None or self.target.device == "mobile"
            self.mobile_package = save_ort_format(
                self.proto, path, target_platform="arm" if mobile else "amd64"
            )
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.proto, str(path))
        return path


@dataclass
class SettingsChoice:
    """The fastest of several session settings, and every candidate's interleaved timing.

    ``best`` can be passed to ``OnnxRuntimeBackend.with_settings(**best)``.
    """

    best: dict[str, Any]
    timings: dict[str, Latency]
    label: str = ""  # best's key in timings
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> settings

    def __str__(self) -> str:
        rows = [
            f"{'*' if k == self.label else ' '} {k:<36} {t}"
            for k, t in sorted(self.timings.items(), key=lambda kv: kv[1].median_ms)
        ]
        return "\n".join(rows)


class OnnxRuntimeBackend:
    """Lower to ONNX Runtime on the target's execution provider, run, and measure.

    >>> backend = OnnxRuntimeBackend(Target.parse("cpu"))
    >>> artifact = backend.compile(gm, (x,))
    >>> backend.measure(artifact, (x,)).median_ms
    """

    name = "onnxruntime"

    def __init__(
        self,
        target: Target | str = "cpu",
        *,
        threads: int | None = None,
        optimization_level: str = "all",
        execution_mode: str = "sequential",
        inter_op_threads: int = 1,
        cache: LatencyCache | None = None,
    ) -> None:
        self.target = Target.parse(target)
        self.threads = threads or available_cores()
        self.optimization_level = _choose("optimization_level", optimization_level, _OPT_LEVELS)
        self.execution_mode = _choose("execution_mode", execution_mode, _EXEC_MODES)
        if self.threads < 1 or inter_op_threads < 1:
            raise BackendError(
                f"threads and inter_op_threads must be 1 or more, not {self.threads} and "
                f"{inter_op_threads}."
            )
        self.inter_op_threads = inter_op_threads
        self.cache = cache
        self.providers = self._providers()

    @property
    def version(self) -> str:
        return ort.__version__

    def settings(self) -> dict[str, Any]:
        """The session settings (part of the latency cache key) and the providers."""
        return {
            "threads": self.threads,
            "optimization_level": self.optimization_level,
            "providers": self.providers,
            "execution_mode": self.execution_mode,
            "inter_op_threads": self.inter_op_threads,
        }

    def with_settings(self, **settings: Any) -> OnnxRuntimeBackend:
        """A copy of this backend with some session settings replaced (``SETTING_NAMES``)."""
        for name in settings:
            if name not in SETTING_NAMES:
                raise BackendError(
                    f"unknown session setting {name!r}."
                    + close_matches(name, SETTING_NAMES)
                    + f" Settings: {', '.join(SETTING_NAMES)}."
                )
        current = {name: getattr(self, name) for name in SETTING_NAMES}
        return OnnxRuntimeBackend(self.target, cache=self.cache, **{**current, **settings})

    def _providers(self) -> list[str]:
        available = ort.get_available_providers()
        if self.target.device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError(
                    "target 'cuda' needs ONNX Runtime's CUDA provider, which this "
                    "onnxruntime build lacks (it has "
                    f"{', '.join(available)}); install onnxruntime-gpu on a "
                    "machine with an NVIDIA GPU, or use target 'cpu'."
                )
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # a mobile target runs here on the CPU provider, to check numbers only (see measure)
        return ["CPUExecutionProvider"]

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = _OPT_LEVELS[self.optimization_level]
        opts.execution_mode = _EXEC_MODES[self.execution_mode]
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.log_severity_level = 3
        # worker threads stop spinning at the end of each run: graphopt times several sessions
        # in alternation in one process, and a session left spinning takes the cores from the
        # next (MobileNetV2, three identical sessions interleaved on 2 cores: median 8.7-10.7
        # ms, p90 16 ms; with this 4.3-4.7 ms, as one session alone: 4.0 ms either way)
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.add_session_config_entry(*EXACT_INT8_CONFIG)  # int8 artifacts compute their QDQ
        return opts

    def load(self, proto: onnx.ModelProto, input_shapes: Any = None) -> OrtArtifact:
        """Build a session for an ONNX model (``input_shapes``: unused, ONNX Runtime takes the
        model's own, dynamic batch included)."""
        try:
            session = ort.InferenceSession(
                proto.SerializeToString(), self.session_options(), providers=self.providers
            )
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not load the model: {first_line(exc)}") from exc
        return OrtArtifact(proto, session, self.target)

    def compile(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        dynamic_batch: bool = True,
    ) -> OrtArtifact:
        """Export ``module`` and build its session.

        With ``dynamic_batch`` (the default) the batch axis stays free; a valid model that
        cannot be exported, loaded or run on its example that way (a model whose code fixes
        the batch, a split of a 1-D input along its only axis...) is exported again with the
        example's batch, and ``artifact.static_batch_reason`` says why. Only when both fail is
        it a ``BackendError``, which gives both reasons.
        """
        names = {"input_names": input_names, "output_names": output_names}
        if not dynamic_batch:
            return self.load(export_onnx(module, example_inputs, dynamic_batch=False, **names))
        batch = next((int(x.shape[0]) for x in example_inputs if x.dim() > 0), None)
        shapes = _output_shapes(module, example_inputs)
        try:
            artifact = self.load(export_onnx(module, example_inputs, **names))
            _runs_on(artifact, example_inputs, shapes)
        except BackendError as exc:
            dynamic_exc = exc
        else:
            if fixed := _fixed_batch_inputs(artifact.proto, example_inputs):
                # the dynamo exporter specializes a batch the model's code fixes, silently
                artifact.static_batch_reason = (
                    f"the batch is fixed at {batch}: the exporter specialized the batch axis "
                    f"of {', '.join(fixed)} (the model's code fixes it, e.g. a reshape to a "
                    "constant batch). Run the artifact with that batch size, or make that "
                    "code use x.shape[0] and optimize again."
                )
                log.warning("ONNX Runtime: %s", artifact.static_batch_reason)
            return artifact
        try:
            artifact = self.load(export_onnx(module, example_inputs, dynamic_batch=False, **names))
            _runs_on(artifact, example_inputs, shapes)
        except BackendError as exc:
            raise BackendError(f"{exc} With a dynamic batch it failed too: {dynamic_exc}") from exc
        artifact.static_batch_reason = (
            f"the batch is fixed at {batch}: with a dynamic batch, {_as_clause(dynamic_exc)}. "
            "Run the artifact with that batch size (or change what fixes the batch in the "
            "model and optimize again)."
        )
        log.warning("ONNX Runtime: %s", artifact.static_batch_reason)
        return artifact

    def measure(
        self,
        model: OrtArtifact | onnx.ModelProto | torch.nn.Module,
        inputs: Sequence[Any],
        *,
        warmup: int = 5,
        runs: int = 50,
        max_time_s: float = 10.0,
        use_cache: bool = True,
    ) -> Latency:
        """Median latency of one call of ``model`` on ``inputs`` (cached on disk by default).

        The key is the ONNX model's bytes hash, the target, ONNX Runtime's version, the
        session settings and the input shapes: a second measurement of the same model is free.
        A mobile target raises ``BackendError``: its latency cannot be measured from here.
        """
        self._refuse_mobile_timing()
        arrays = [to_numpy(x) for x in inputs]
        if isinstance(model, torch.nn.Module):
            model = self.compile(model, [torch.from_numpy(a) for a in arrays])
        artifact = model if isinstance(model, OrtArtifact) else self.load(model)
        key = cache_key(
            model=_proto_hash(artifact.proto),
            target=str(self.target),
            backend=self.name,
            version=self.version,
            settings=self.settings(),
            shapes=[(a.shape, str(a.dtype)) for a in arrays],
            runs=runs,
            warmup=warmup,
        )
        return cached_latency(
            key,
            lambda: time_callable(
                lambda: artifact.run(arrays), warmup=warmup, runs=runs, max_time_s=max_time_s
            ),
            self.cache,
            use_cache,
        )

    def candidate_settings(self) -> list[dict[str, Any]]:
        """The default candidates of ``select_settings`` (at most 5).

        Intra-op threads 1 and all cores, each at optimization level "all" and "extended",
        sequential; and one parallel run with 2 inter-op threads sharing the cores.
        """
        cores = available_cores()
        candidates = []
        for level in ("all", "extended"):
            for threads in dict.fromkeys((1, cores)):  # deduped when there is one core
                candidates.append(
                    {
                        "threads": threads,
                        "optimization_level": level,
                        "execution_mode": "sequential",
                        "inter_op_threads": 1,
                    }
                )
        if cores >= 2:  # with one core a second inter-op thread can only oversubscribe it
            candidates.append(
                {
                    "threads": max(1, cores // 2),
                    "optimization_level": "all",
                    "execution_mode": "parallel",
                    "inter_op_threads": 2,
                }
            )
        return candidates

    def select_settings(
        self,
        proto_or_artifact: OrtArtifact | onnx.ModelProto,
        inputs: Sequence[Any],
        *,
        candidates: Sequence[Mapping[str, Any]] | None = None,
        runs: int = 20,
        warmup: int = 3,
        max_time_s: float = 20.0,
    ) -> SettingsChoice:
        """Time the model under each candidate session setting, interleaved; pick the fastest.

        ``candidates``: dicts of ``SETTING_NAMES`` overrides, default ``candidate_settings()``.
        All sessions are timed in one ``time_interleaved`` run (each timed call re-warmed), so
        load drift hits them alike; the lowest median wins. Nothing global changes: apply the
        choice with ``backend.with_settings(**choice.best)``.
        """
        self._refuse_mobile_timing()
        proto = (
            proto_or_artifact.proto
            if isinstance(proto_or_artifact, OrtArtifact)
            else proto_or_artifact
        )
        arrays = [to_numpy(x) for x in inputs]
        current = {name: getattr(self, name) for name in SETTING_NAMES}
        if candidates is None:
            candidates = self.candidate_settings()
        chosen = [{**current, **c} for c in candidates]
        if not chosen:
            raise BackendError("select_settings needs at least one candidate setting.")
        labelled = {_settings_label(c): c for c in chosen}  # same label, same settings
        artifacts = {label: self.with_settings(**c).load(proto) for label, c in labelled.items()}
        timings = time_interleaved(
            {label: (lambda a=a: a.run(arrays)) for label, a in artifacts.items()},
            warmup=warmup,
            runs=runs,
            max_time_s=max_time_s,
            rewarm=2,
        )
        best = min(timings, key=lambda label: timings[label].median_ms)
        log.info("session settings: %s wins (%s)", best, timings[best])
        return SettingsChoice(dict(labelled[best]), timings, best, labelled)

    def _refuse_mobile_timing(self) -> None:
        if self.target.device == "mobile":
            raise BackendError(
                f"target {self.target} is a phone/board: its latency can't be measured from "
                "here (this backend runs the model on this machine's CPU only to check its "
                "numbers). Use the TVM backend with an RPC device to time it on the device, or "
                "measure with target 'cpu' for this machine."
            )


def _proto_hash(proto: onnx.ModelProto) -> str:
    import hashlib

    return hashlib.blake2b(proto.SerializeToString(), digest_size=16).hexdigest()


def _settings_label(settings: Mapping[str, Any]) -> str:
    mode = settings["execution_mode"]
    if mode == "parallel":
        mode = f"parallel(inter={settings['inter_op_threads']})"
    return f"threads={settings['threads']} {mode} {settings['optimization_level']}"


def _choose(name: str, value: str, choices: Mapping[str, Any]) -> str:
    if value not in choices:
        raise BackendError(
            f"{name} must be one of {', '.join(choices)}, not {value!r}."
            + close_matches(str(value), choices)
        )
    return value


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array of a tensor or an array (bfloat16 and float8 as ml_dtypes arrays)."""
    if isinstance(x, torch.Tensor):
        from graphopt.onnx_import import to_numpy as tensor_to_numpy

        return tensor_to_numpy(x)
    if isinstance(x, np.ndarray):
        return x
    raise InputError(f"inputs must be torch tensors or numpy arrays, not {type(x).__name__}.")

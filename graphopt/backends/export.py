"""Torch -> ONNX export, shared by both backends, capture and the API.

Export uses torch's TorchScript-based exporter (``dynamo=False``): on the zoo models it is ~15x
faster than the dynamo exporter (0.15 s against 2.5 s on a small CNN here), handles FX graphs
with arbitrary ``call_function`` nodes, and keeps the model's dynamic axes (the batch, or any
axis: :mod:`graphopt.core.dynamic_axes`) symbolic through ``dynamic_axes``. Where it fails the dynamo exporter (``onnxscript``) is tried. One export runs
at a time in a process (``EXPORT_LOCK``: ``torch.onnx.export`` is not thread-safe; torch.export
shares its state, so capture and the TVM importer hold it too). The export keeps the model's
interface: every input by name, count and order (also one no node reads), one output per output
tensor (``output_names``), and integer inputs that feed a shape stay inputs (see
:mod:`graphopt.backends.shape_ops`).

(:mod:`graphopt.backends.arrays` converts the tensors to the arrays the runtimes take.)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import threading
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import onnx
import torch

from graphopt._util import first_line
from graphopt.backends.onnx_node import restore_onnx_nodes
from graphopt.backends.shape_ops import with_shape_ops
from graphopt.core.dynamic_axes import batch_axes, resolve
from graphopt.core.numerics import flatten_outputs
from graphopt.errors import BackendError

log = logging.getLogger(__name__)

OPSET = 17
MAX_IR_VERSION = 10  # ONNX Runtime 1.31 rejects IR 14, which onnx 1.23 stamps by default

# torch.onnx.export is not thread-safe (both exporters keep global state: the TorchScript
# exporter's GLOBALS, the dynamo exporter's registries): concurrent optimize() calls in threads
# failed inside it, 4 of 6. Every export in this process holds this lock.
EXPORT_LOCK = threading.RLock()


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    output_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Export ``module`` to an ONNX ``ModelProto`` with symbolic ``dynamic_axes``.

    ``dynamic_axes`` (``{input name: {axis: dim name}}``, see :mod:`graphopt.core.dynamic_axes`)
    are the inputs' axes that stay symbolic; None means the batch, axis 0 of every input; ``{}``
    a static model. ``output_axes`` names the outputs' symbolic axes the same way; without it
    the exporter's shape inference finds them, and each gets its input's dim name where it is
    one (``batch``), else ``<output>_dim<axis>``.

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
        outputs = flatten_outputs(module(*_copies(inputs)))
    if output_names is not None and len(output_names) != len(outputs):
        raise BackendError(
            f"{len(output_names)} output name(s) for the {len(outputs)} output tensor(s) the "
            "model returns: give one name per output, in order (or none for output0...)."
        )
    out_names = _interface_names(output_names, "output", len(outputs))
    axes = (
        batch_axes(names, inputs) if dynamic_axes is None else resolve(dynamic_axes, names, inputs)
    )
    symbolic = {**axes, **{n: dict(a) for n, a in (output_axes or {}).items() if a}}
    # the TorchScript exporter refuses all-digit names ("Invalid name: '7'", as torch.onnx.export
    # names outputs by default): those are exported under stand-ins and renamed afterwards
    stand_ins = {n: f"graphopt_{i}_{n}" for i, n in enumerate(names + out_names) if n.isdigit()}
    traced_in = [stand_ins.get(n, n) for n in names]
    traced_out = [stand_ins.get(n, n) for n in out_names]
    traced_axes = {stand_ins.get(n, n): a for n, a in symbolic.items()}
    with EXPORT_LOCK, _exportable(module) as exportable:
        try:
            proto = _export_torchscript(
                exportable, _copies(inputs), traced_in, traced_out, traced_axes, opset
            )
        except Exception as legacy_exc:  # noqa: BLE001 - fall back on the other exporter
            log.info("TorchScript exporter failed (%s); trying the dynamo exporter", legacy_exc)
            proto = _export_dynamo(
                module, _copies(inputs), names, out_names, axes, opset, legacy_exc
            )
    _rename_values(proto, {t: n for n, t in stand_ins.items()})
    restore_onnx_nodes(proto)  # opaque ONNX nodes of an imported model, as they were
    _keep_interface(proto, names, inputs, out_names, axes)
    _name_output_dims(proto, symbolic)
    _explicit_same_pads(proto)
    _positive_perms(proto)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


def _export_torchscript(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: list[str],
    out_names: list[str],
    axes: Mapping[str, Mapping[int, str]],
    opset: int,
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _AttentionForExport():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=out_names,
            dynamic_axes=dict(axes) or None,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _rename_values(proto: onnx.ModelProto, renames: Mapping[str, str]) -> None:
    """Rename values of ``proto``'s graph (interface, node inputs and outputs, value_info); a
    value that already has a new name is renamed out of the way first."""
    if not renames:
        return
    graph = proto.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    renames = dict(renames)
    for new in list(renames.values()):
        if new in taken and new not in renames:
            renames[new] = f"{new}_value"
    for node in graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
        node.output[:] = [renames.get(x, x) for x in node.output]
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        vi.name = renames.get(vi.name, vi.name)


def _copies(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def output_shapes(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[Any]:
    """The shapes of ``module``'s output tensors on ``inputs`` (run on copies of them)."""
    with torch.no_grad():
        outputs = flatten_outputs(module(*_copies(tuple(inputs))))
    return [tuple(t.shape) for t in outputs]


def _export_dynamo(module, inputs, names, out_names, axes, opset, legacy_exc):
    dims = {d: torch.export.Dim(d) for a in axes.values() for d in a.values()}
    dynamic_shapes = tuple(
        {axis: dims[d] for axis, d in axes[n].items()} if axes.get(n) else None for n in names
    )
    if not dims:
        dynamic_shapes = None
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
      ``Slice``/``Range`` whose shape is a runtime tensor) read the shape with ``tolist()``, which
      tracing freezes to the example's values: in a copy of the graph the helpers registered
      with :func:`~graphopt.backends.shape_ops.exports_as` become functions that export as the
      ONNX op itself, with the shape tensor kept as its input.
    * A ``torch.export`` graph with dynamic axes reads sizes with ``aten.sym_size.int``, whose
      int the tracer records as a constant: :func:`_with_traced_sizes`.
    """
    patched = {m: (m.train, m.eval) for m in module.modules() if _refuses_train(m)}
    for m in patched:
        m.train = types.MethodType(lambda self, mode=True: self, m)
        m.eval = types.MethodType(lambda self: self, m)
    try:
        yield _with_module_scopes(_with_traced_sizes(with_shape_ops(module)))
    finally:
        for m, (train, evaluate) in patched.items():  # torch.export's own refusal again
            m.train, m.eval = train, evaluate


def _with_traced_sizes(module: torch.nn.Module) -> torch.nn.Module:
    """A GraphModule whose sizes read at run time stay symbolic through the TorchScript tracer.

    A ``torch.export`` graph with dynamic axes reads sizes with ``aten.sym_size.int(x, d)`` and
    passes them (and ints computed from them: ``s0 * s1``) to ops as ``aten.view.default(y,
    [s0, s1, -1, 32])``. The tracer records ``x.size(d)`` as ONNX ``Shape`` -> ``Gather`` only
    when the ops that take it are called through torch's Python bindings (``Tensor.view``):
    ``sym_size`` itself and an ``OpOverload`` take the example's int, a constant that froze
    every dynamic axis it reached. In a copy of the graph, ``sym_size`` becomes ``x.size(d)``
    and each op taking such a size its Python binding (``aten.slice``, which has none, an index).
    """
    if not isinstance(module, torch.fx.GraphModule):
        return module
    graph = copy.deepcopy(module.graph)
    sizes = {n for n in graph.nodes if n.target is torch.ops.aten.sym_size.int}
    if not sizes:
        return module
    for node in graph.nodes:
        if node in sizes:
            node.op, node.target = "call_method", "size"
            continue
        if node.op != "call_function" or not sizes.intersection(node.all_input_nodes):
            continue
        if getattr(node.target, "__module__", "") == "_operator":  # s0 * s1: a size too
            sizes.add(node)
        elif isinstance(node.target, torch._ops.OpOverload):
            node.target = _python_binding(node.target)
    twin = torch.fx.GraphModule(module, graph)
    twin.train(module.training)
    return twin


def _python_binding(op: torch._ops.OpOverload) -> Any:
    """``torch.view``/``Tensor.view`` for ``aten.view.default``: the same schema, traced
    through the Python argument parser; ``op`` itself where torch has none."""
    name = op.overloadpacket.__name__
    if name == "slice":
        return _slice
    return getattr(torch, name, None) or getattr(torch.Tensor, name, None) or op


def _slice(x: torch.Tensor, dim: int = 0, start: Any = None, end: Any = None, step: Any = 1) -> Any:
    """``aten.slice.Tensor`` as an index, which the tracer records with its bounds symbolic."""
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def _with_module_scopes(module: torch.nn.Module) -> torch.nn.Module:
    """A GraphModule whose ONNX nodes get the PyTorch module path in their names.

    Exporting ``nn.Module`` s, the TorchScript exporter names a node after the modules it ran
    in (``/layer1/layer1.0/conv1/Conv``); a GraphModule calls only its leaf modules, so the
    same conv came out as ``/conv1/Conv`` and a ReLU of that block as ``/Relu``. In a copy of
    the graph, calls that enter and leave the modules' tracing scopes go where the module a
    node ran inside (``meta["nn_module_stack"]``, or a ``call_module`` target's parents)
    changes; nothing they do reaches the computation.
    """
    if not isinstance(module, torch.fx.GraphModule):
        return module
    graph = copy.deepcopy(module.graph)
    stack: list[str] = []  # the scopes entered, outermost first
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        path = _module_path(node)
        common = 0
        while common < min(len(stack), len(path)) and stack[common] == path[common]:
            common += 1
        with graph.inserting_before(node):
            if len(stack) > common:
                graph.call_function(_leave_scopes, (len(stack) - common,))
            if len(path) > common:
                graph.call_function(_enter_scopes, (tuple(map(_scope_name, path[common:])),))
        stack = path
    if not any(n.target is _enter_scopes for n in graph.nodes):
        return module
    twin = torch.fx.GraphModule(module, graph)
    twin.train(module.training)
    return twin


def _module_path(node: torch.fx.Node) -> list[str]:
    """The modules ``node`` ran inside, outermost first (a ``call_module``: its parents; the
    exporter enters the module itself)."""
    if node.op == "output":
        return []
    entries = [(p, v) for p, v in (node.meta.get("nn_module_stack") or {}).items() if p]
    stack = [p for p, _ in entries]
    if node.op == "call_module":
        atoms = str(node.target).split(".")
        if len(atoms) == 1 and entries:  # a module a pass added (reparam_0, merged_conv_0):
            # the path of the node it replaced, without that node's own leaf layer
            return stack[:-1] if _is_layer(entries[-1][1]) else stack
        return [".".join(atoms[:i]) for i in range(1, len(atoms))]
    return stack


def _is_layer(entry: Any) -> bool:
    """An ``nn_module_stack`` entry ``(path, class)`` of one of torch's own leaf layers."""
    cls = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else None
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    return (
        isinstance(cls, type)
        and cls.__module__.startswith("torch.nn.modules")
        and not issubclass(cls, containers)
    )


def _scope_name(path: str) -> str:
    # the exporter's own naming of a module at ``path``: the last atoms from the last name
    # that is not a number (``layer1.0`` stays, ``layer1.0.conv1`` is ``conv1``)
    atoms = path.split(".")
    last = next((i for i in range(len(atoms) - 1, -1, -1) if not atoms[i].isnumeric()), 0)
    return torch._C._jit_onnx_create_full_scope_name("Module", ".".join(atoms[last:]))


def _enter_scopes(names: tuple[str, ...]) -> None:
    state = torch._C._get_tracing_state()
    for name in names if state else ():
        state.push_scope(name)


def _leave_scopes(count: int) -> None:
    state = torch._C._get_tracing_state()
    for _ in range(count if state else 0):
        state.pop_scope()


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
    axes: Mapping[str, Mapping[int, str]],
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
            present.get(n) or _value_info(n, x, axes.get(n, {}))
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


def _value_info(name: str, x: torch.Tensor, axes: Mapping[int, str]) -> onnx.ValueInfoProto:
    if x.dtype not in _ONNX_DTYPES:
        raise BackendError(f"input {name!r} has dtype {x.dtype}, which ONNX export cannot declare.")
    dims: list[Any] = [axes.get(i, d) for i, d in enumerate(x.shape)]
    return onnx.helper.make_tensor_value_info(name, _ONNX_DTYPES[x.dtype], dims)


def _name_output_dims(proto: onnx.ModelProto, axes: Mapping[str, Mapping[int, str]]) -> None:
    """Outputs' symbolic dims named for a reader: the exporter's inferred names
    (``Addoutput_dim_0``) become ``<output>_dim<axis>``; an input's dim name (``batch``) or a
    name the caller gave stays."""
    known = {d for a in axes.values() for d in a.values()}
    for out in proto.graph.output:
        for axis, dim in enumerate(out.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") or dim.dim_param in known:
                continue
            dim.dim_param = f"{out.name}_dim{axis}"


def add_value_info(proto: onnx.ModelProto) -> None:
    """Give ``proto`` ONNX shape inference's ``value_info`` (each tensor's dtype and shape, for
    Netron and other readers of a saved model); left without it where inference fails. Not
    part of every export: it costs ~0.45 s on ResNet-50, and only the artifact a user keeps
    is read (:func:`graphopt.lowering.result.stamp`)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - shapes are a help to readers, never required
        log.info("ONNX shape inference failed on the artifact (%s); no value_info", exc)
        return
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)


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

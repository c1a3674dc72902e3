"""One ONNX node run by ONNX Runtime inside a torch graph, exported back as that very node.

An ONNX op that graphopt has no converter for stays an *opaque node*: the importer keeps the
``NodeProto`` (domain, attributes and subgraphs as they are) and the graph calls
:func:`run_onnx_node`, which runs the node alone in ONNX Runtime (a one-node model with the
original model's opsets; a session per input-dtype signature, cached on the :class:`NodeSpec`).
Values that the node's subgraphs read from the enclosing graph (``If``/``Loop`` branches use
names of the outer scope) are explicit inputs of the call.

At export, :class:`_OnnxNodeOp` writes a placeholder ``graphopt.onnx_node::Node`` that carries the
serialized node and the names of its inputs; :func:`restore_onnx_nodes` then puts the original
node back in its place, with its inputs and outputs renamed to the exported graph's values and
the names local to its subgraphs prefixed so that they cannot clash with the exported graph's.
The backends own this op and import no frontend: the frontend builds a :class:`NodeSpec` and
calls :func:`run_onnx_node`.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from graphopt.backends.arrays import from_numpy, to_numpy
from graphopt.errors import BackendError

PLACEHOLDER_DOMAIN = "graphopt.onnx_node"
_TORCH_TO_ONNX = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float64: onnx.TensorProto.DOUBLE,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.int64: onnx.TensorProto.INT64,
    torch.int32: onnx.TensorProto.INT32,
    torch.int16: onnx.TensorProto.INT16,
    torch.int8: onnx.TensorProto.INT8,
    torch.uint8: onnx.TensorProto.UINT8,
    torch.bool: onnx.TensorProto.BOOL,
}


@dataclass(eq=False)
class NodeSpec:
    """What runs and re-exports one ONNX node.

    ``node``: the serialized ``NodeProto``; ``inputs``: the ONNX names of the values the call
    passes, in order (the node's present inputs, then the outer-scope names its subgraphs read,
    each once); ``opsets``: the original model's ``(domain, version)`` imports; ``functions``:
    its serialized model-local functions; ``ir_version``: its IR version.
    """

    node: bytes
    inputs: tuple[str, ...]
    opsets: tuple[tuple[str, int], ...]
    functions: tuple[bytes, ...] = ()
    ir_version: int = 8
    output_types: tuple[tuple[torch.dtype, int], ...] = ()
    _sessions: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # sessions and locks are rebuilt, not copied
        state = dict(self.__dict__)
        state["_sessions"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def proto(self) -> onnx.NodeProto:
        return onnx.NodeProto.FromString(self.node)

    @property
    def output_count(self) -> int:
        return sum(1 for o in self.proto.output if o)

    def session(self, dtypes: tuple[torch.dtype, ...]) -> Any:
        with self._lock:
            if dtypes not in self._sessions:
                self._sessions[dtypes] = _session(self, dtypes)
            return self._sessions[dtypes]


def _session(spec: NodeSpec, dtypes: tuple[torch.dtype, ...]) -> Any:
    import onnxruntime as ort

    node = spec.proto
    inputs = []
    for name, dtype in zip(spec.inputs, dtypes, strict=True):
        if dtype not in _TORCH_TO_ONNX:
            raise BackendError(
                f"ONNX node {node.name!r} ({node.op_type}) gets an input of dtype {dtype}, "
                "which graphopt cannot pass to ONNX Runtime."
            )
        inputs.append(onnx.helper.make_tensor_value_info(name, _TORCH_TO_ONNX[dtype], None))
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    graph = onnx.helper.make_graph([node], "onnx_node", inputs, outputs)
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in spec.opsets],
        functions=[onnx.FunctionProto.FromString(f) for f in spec.functions],
    )
    model.ir_version = spec.ir_version
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise BackendError(
            f"ONNX Runtime cannot run the ONNX node {node.name!r} ({node.domain or 'ai.onnx'}::"
            f"{node.op_type}) that graphopt keeps opaque: {exc}"
        ) from exc


def _run(spec: NodeSpec, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    session = spec.session(tuple(t.dtype for t in tensors))
    feeds = {name: to_numpy(t) for name, t in zip(spec.inputs, tensors, strict=True)}
    outputs = session.run(None, feeds)
    return tuple(
        _as_torch(o, info.type) for o, info in zip(outputs, session.get_outputs(), strict=True)
    )


# ONNX Runtime's Python API returns bfloat16 and float8 outputs as their raw bytes
_RAW_BYTES = {
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(float8e4m3fn)": torch.float8_e4m3fn,
    "tensor(float8e4m3fnuz)": torch.float8_e4m3fnuz,
    "tensor(float8e5m2)": torch.float8_e5m2,
    "tensor(float8e5m2fnuz)": torch.float8_e5m2fnuz,
}


def _as_torch(array: np.ndarray, onnx_type: str) -> torch.Tensor:
    """An ORT output as the torch tensor of its ONNX type (float8/bfloat16 from their bytes)."""
    dtype = _RAW_BYTES.get(onnx_type)
    if dtype is not None and array.dtype.kind in "ui":
        return torch.from_numpy(np.array(array, copy=True)).view(dtype)
    return from_numpy(array)


class _OnnxNodeOp(torch.autograd.Function):
    """The node run by ONNX Runtime; exported as a placeholder that carries the node."""

    @staticmethod
    def forward(ctx: Any, spec: NodeSpec, *tensors: torch.Tensor) -> Any:
        outputs = _run(spec, tensors)
        # dtype and rank for the exporter's shape inference (sizes stay unknown: dynamic)
        spec.output_types = tuple((o.dtype, o.dim()) for o in outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def symbolic(g: Any, spec: NodeSpec, *values: Any) -> Any:
        outputs = g.op(
            f"{PLACEHOLDER_DOMAIN}::Node",
            *values,
            node_s=base64.b64encode(spec.node).decode("ascii"),
            inputs_s=json.dumps(list(spec.inputs)),
            opsets_s=json.dumps([list(o) for o in spec.opsets]),
            outputs=spec.output_count,
        )
        for value, (dtype, rank) in zip(
            outputs if spec.output_count > 1 else (outputs,), spec.output_types, strict=False
        ):
            value.setType(torch._C.TensorType.get().with_dtype(dtype).with_sizes([None] * rank))
        return outputs


def run_onnx_node(spec: NodeSpec, *tensors: torch.Tensor) -> Any:
    """Run the ONNX node of ``spec`` on ``tensors`` (in ``spec.inputs`` order) with ONNX
    Runtime: one tensor, or a tuple for a node with several outputs."""
    return _OnnxNodeOp.apply(spec, *tensors)


# --------------------------------------------------------------------------- export


def restore_onnx_nodes(proto: onnx.ModelProto) -> None:
    """Replace every placeholder that :func:`run_onnx_node` exported as by the original node
    (in place): same op, domain, attributes and subgraphs; the opsets its domains need are
    imported (the default domain at the higher of the two versions). Raises
    :class:`BackendError` when a default-domain op means something else at that version than
    where it came from (the exporter's opset, or the node's own model's)."""
    graph = proto.graph
    if not any(n.domain == PLACEHOLDER_DOMAIN for n in graph.node):
        return
    imports = {o.domain: o.version for o in proto.opset_import}
    exported = imports.get("", 1)
    nodes, sources = [], []
    for k, node in enumerate(graph.node):
        if node.domain != PLACEHOLDER_DOMAIN:
            nodes.append(node)
            sources += [(n, exported) for n in _all_nodes([node])]
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        original = onnx.NodeProto.FromString(base64.b64decode(attrs["node"]))
        names = dict(zip(json.loads(attrs["inputs"]), node.input, strict=True))
        opsets = {d or "": int(v) for d, v in json.loads(attrs["opsets"])}
        own = opsets.get("", opsets.get("ai.onnx", 1))
        for domain in _domains(original):
            if domain in ("", "ai.onnx"):
                imports[""] = max(imports.get("", 1), own)
            elif domain in opsets:
                imports.setdefault(domain, opsets[domain])
        nodes.append(_renamed(original, names, list(node.output), f"graphopt_node{k}/"))
        sources += [(n, own) for n in _all_nodes([original])]
    _check_default_opset(sources, imports.get("", 1))
    del graph.node[:]
    graph.node.extend(nodes)
    del proto.opset_import[:]
    proto.opset_import.extend(
        onnx.helper.make_opsetid(d, v) for d, v in imports.items() if d != PLACEHOLDER_DOMAIN
    )


def _domains(node: onnx.NodeProto) -> set[str]:
    return {n.domain for n in _all_nodes([node])}


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            subs.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            subs.extend(a.graphs)
    return subs


def _all_nodes(nodes: Any) -> list[onnx.NodeProto]:
    found = []
    for n in nodes:
        found.append(n)
        for sub in _subgraphs(n):
            found.extend(_all_nodes(sub.node))
    return found


def _since(op: str, version: int) -> int | None:
    try:
        return onnx.defs.get_schema(op, version).since_version
    except onnx.defs.SchemaError:  # unknown to this onnx, or not defined yet: ORT decides
        return None


# Ops whose later versions only add types, optional inputs or attributes whose defaults keep
# the old meaning: a node of an older opset means the same at a newer one (not the reverse).
_UPGRADES_KEEP_MEANING = frozenset(
    [
        "If",
        "Loop",
        "Scan",
        "Identity",
        "LSTM",
        "GRU",
        "RNN",
        "Equal",
        "Cast",
        "Resize",
        "Shape",
        "Size",
        "Where",
        "Constant",
        "ConstantOfShape",
        "Reshape",
        "Pad",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Flatten",
        "LessOrEqual",
        "GreaterOrEqual",
    ]
)


def _check_default_opset(sources: list[tuple[onnx.NodeProto, int]], version: int) -> None:
    """Every default-domain op must mean at ``version`` what it meant at its source's."""
    for node, source in sources:
        if node.domain not in ("", "ai.onnx") or source == version:
            continue
        if source < version and node.op_type in _UPGRADES_KEEP_MEANING:
            continue
        if _since(node.op_type, version) != _since(node.op_type, source):
            raise BackendError(
                f"the ONNX node {node.name!r} ({node.op_type}) comes from opset {source}, but "
                f"the exported model needs opset {version}, where {node.op_type} is defined "
                f"differently: graphopt cannot re-emit it unchanged. Convert the model to one "
                f"opset first (onnx.version_converter) and optimize that."
            )


def _renamed(
    node: onnx.NodeProto, names: dict[str, str], outputs: list[str], prefix: str
) -> onnx.NodeProto:
    """A copy of ``node`` reading the exported graph's values: inputs by ``names``, present
    outputs named ``outputs``, names local to its subgraphs prefixed with ``prefix``."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    local = {name: prefix + name for name in _local_names(out)}
    mapping = {**local, **names}
    del out.input[:]
    out.input.extend(names.get(i, i) if i else "" for i in node.input)
    present = iter(outputs)
    del out.output[:]
    out.output.extend(next(present) if o else "" for o in node.output)
    for sub in _subgraphs(out):
        _rename_graph(sub, mapping)
    return out


def _local_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for sub in _subgraphs(node):
        names |= {v.name for v in sub.input} | {t.name for t in sub.initializer}
        names |= {s.values.name for s in sub.sparse_initializer}
        for n in sub.node:
            names |= {o for o in n.output if o}
            names |= _local_names(n)
    return names


def _rename_graph(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    def new(name: str) -> str:
        return mapping.get(name, name) if name else name

    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = new(vi.name)
    for t in graph.initializer:
        t.name = new(t.name)
    for s in graph.sparse_initializer:
        s.values.name = new(s.values.name)
    for n in graph.node:
        names = [new(i) for i in n.input]
        del n.input[:]
        n.input.extend(names)
        names = [new(o) for o in n.output]
        del n.output[:]
        n.output.extend(names)
        for sub in _subgraphs(n):
            _rename_graph(sub, mapping)

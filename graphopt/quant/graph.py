"""An index of an ONNX graph for the int8 stage, and the small helpers every quant module needs.

:class:`GraphIndex` answers what the rewrites ask of a graph: who produces and who reads a
tensor, which tensors are initializers (and their values), and, with ``types=True``, the element
type and channel count shape inference gives each tensor. It is a view: ``set`` writes into the
model it indexes.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "GraphIndex",
    "attr",
    "fixed_batch",
    "input_dtype",
    "input_names",
    "named",
    "opset",
]


class GraphIndex:
    """Initializers, producers and consumers of ``model``'s graph (views into ``model``).

    ``types=True`` also runs ONNX shape inference once: ``elem_type`` and ``channels`` (the size
    of axis 1, where known) per tensor. Build it before rewriting the graph: the types are those
    of the graph as it was then.
    """

    def __init__(self, model: onnx.ModelProto, *, types: bool = False) -> None:
        self.model = model
        g = model.graph
        self.init = {t.name: t for t in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.init]
        self.outputs = {o.name for o in g.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}  # one entry per use
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.elem_type: dict[str, int] = {}
        self.channels: dict[str, int] = {}
        if types:
            self._infer_types()

    def _infer_types(self) -> None:
        inferred = onnx.shape_inference.infer_shapes(self.model).graph
        for vi in itertools.chain(inferred.value_info, inferred.input, inferred.output):
            self.elem_type[vi.name] = vi.type.tensor_type.elem_type
            dims = vi.type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[1].HasField("dim_value"):
                self.channels[vi.name] = dims[1].dim_value

    def is_float_activation(self, name: str) -> bool:
        """A float32 tensor computed at run time (needs ``types=True``)."""
        return (
            bool(name) and name not in self.init and self.elem_type.get(name) == TensorProto.FLOAT
        )

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.init[name])

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or of a ``Constant`` node's output; None otherwise."""
        if name in self.init:
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto):
                return numpy_helper.to_array(value)
            if isinstance(value, (int, float, list)):  # value_float(s), value_int(s)
                return np.asarray(value)
        return None

    def own_const(self, name: str) -> np.ndarray | None:
        """A copy of the float32 initializer ``name`` when exactly one node input reads it (so
        that rewriting it changes nothing else), else None."""
        t = self.init.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(self.consumers.get(name, [])) != 1:
            return None
        return numpy_helper.to_array(t).copy()

    def set(self, name: str, array: np.ndarray) -> None:
        """Overwrite initializer ``name`` with ``array`` as float32."""
        self.init[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """Attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset ``model`` imports (0 if none)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every node named (``<op>_<index>`` where unnamed): decisions,
    skip lists and the stage's annotations refer to nodes by name. An ``Identity`` of an
    initializer becomes an initializer of its own (``torch.onnx.export`` writes equal constants,
    such as the zero biases of convolutions folded from identity BatchNorms, once and the others
    as Identity nodes of it): every layer then owns its weights and bias, which bias correction
    shifts and insert-qdq quantises one layer at a time."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    outputs = {o.name for o in work.graph.output}
    kept = []
    for node in work.graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.input else ""
        if source in inits and node.output[0] not in outputs:
            own = onnx.TensorProto()
            own.CopyFrom(inits[source])
            own.name = node.output[0]
            work.graph.initializer.append(own)
        else:
            kept.append(node)
    del work.graph.node[:]
    work.graph.node.extend(kept)
    for i, node in enumerate(work.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return work


def input_names(model: onnx.ModelProto) -> list[str]:
    """The graph inputs that are not initializers, in order."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def input_dtype(model: onnx.ModelProto, name: str) -> np.dtype:
    """The numpy dtype of graph input ``name``."""
    vi = next(i for i in model.graph.input if i.name == name)
    return helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size every input of ``model`` fixes (dim 0 a number), else None (dynamic)."""
    sizes = set()
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None

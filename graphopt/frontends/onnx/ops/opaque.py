"""Opaque nodes: an ONNX node the importer has no converter for, kept as it is.

The node becomes an :class:`OnnxNode` submodule (``call_module``): passes see an unknown module,
a barrier they do not rewrite through; running the graph runs the node alone in ONNX Runtime;
the export writes the very node back (same domain, attributes and subgraphs; see
:mod:`graphopt.backends.onnx_node`). A node whose inputs are all constants runs at import (its
outputs become constants). The reason it is opaque is kept in ``meta["onnx_opaque"]`` of its FX
node and in ``gm.meta["onnx_opaque"]`` (node name -> reason).

The values its subgraphs read from the enclosing scope (an ``If`` branch using the outer
graph's tensors) are inputs of the call too, so that passes and dead-code elimination see them.
"""

from __future__ import annotations

import operator
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import nn

from graphopt.backends.onnx_node import NodeSpec, run_onnx_node
from graphopt.errors import BackendError, CaptureError
from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.values import ONNX_TO_TORCH, Sym, Value


class OnnxNode(nn.Module):
    """One ONNX node, run by ONNX Runtime (see :class:`~graphopt.backends.onnx_node.NodeSpec`)."""

    def __init__(self, spec: NodeSpec, reason: str) -> None:
        super().__init__()
        self.spec = spec
        self.reason = reason

    def forward(self, *tensors: torch.Tensor) -> Any:
        return run_onnx_node(self.spec, *tensors)

    def extra_repr(self) -> str:
        node = self.spec.proto
        return f"{node.domain or 'ai.onnx'}::{node.op_type}, reason={self.reason!r}"


def outer_names(node: onnx.NodeProto) -> list[str]:
    """The names the node's subgraphs read from the enclosing scope, in first-use order."""
    found: list[str] = []
    for sub in _subgraphs(node):
        _visit(sub, set(), found)
    return found


def _visit(graph: onnx.GraphProto, defined: set[str], found: list[str]) -> None:
    defined = defined | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    for n in graph.node:
        for name in n.input:
            if name and name not in defined and name not in found:
                found.append(name)
        for sub in _subgraphs(n):
            _visit(sub, defined, found)
        defined |= {o for o in n.output if o}
    for out in graph.output:
        if out.name not in defined and out.name not in found:
            found.append(out.name)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            subs.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            subs.extend(a.graphs)
    return subs


def opaque(ctx: Ctx, reason: str) -> list[Value | None]:
    """Keep ``ctx``'s node as an :class:`OnnxNode`; the values of its outputs."""
    node, imp = ctx.node, ctx.imp
    names: list[str] = []
    for name in [i for i in node.input if i] + outer_names(node):
        if name not in names and name in imp.env:
            names.append(name)
    spec = NodeSpec(
        node=node.SerializeToString(),
        inputs=tuple(names),
        opsets=tuple((o.domain, o.version) for o in imp.model.opset_import),
        functions=tuple(f.SerializeToString() for f in imp.model.functions),
        ir_version=min(imp.model.ir_version or 8, 10),
    )
    _check_runnable(ctx, spec, reason)
    values = [ctx.materialize(imp.env[n]) for n in names]
    result = ctx.module(OnnxNode(spec, reason), *values)
    if isinstance(result, fx.Node):
        result.meta["onnx_opaque"] = reason
        imp.opaque[ctx.name] = reason
    present = [o for o in node.output if o]
    if len(present) == 1:
        parts: list[Any] = [result]
    elif isinstance(result, fx.Node):
        parts = [ctx.call(operator.getitem, result, k) for k in range(len(present))]
    else:
        parts = list(result)
    it = iter(parts)
    return [next(it) if o else None for o in node.output]


def _check_runnable(ctx: Ctx, spec: NodeSpec, reason: str) -> None:
    """Open the node's ONNX Runtime session now, where the input dtypes are known, so that a
    node neither graphopt nor ONNX Runtime can run fails at import, not when the graph runs."""
    dtypes = []
    for name in spec.inputs:
        v = ctx.imp.env[name]
        if isinstance(v, torch.Tensor | Sym):
            dtypes.append(v.dtype)
        elif (dtype := ONNX_TO_TORCH.get(ctx.imp.elem_types.get(name, 0))) is not None:
            dtypes.append(dtype)
        else:  # unknown until the graph runs: the session opens then
            return
    try:
        spec.session(tuple(dtypes))
    except BackendError as exc:
        raise CaptureError(
            f"{reason}; and ONNX Runtime cannot run the node either ({exc}), so graphopt "
            f"cannot keep it as an opaque node. Re-export the model without it."
        ) from exc

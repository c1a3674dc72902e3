"""If: a constant condition inlines the taken branch; otherwise the node stays opaque.

The condition is constant when it is known at import: an initializer or ``Constant``, anything
folded from them, or a shape value whose items are all ints -- ``Equal(Gather(Shape(x), 1), 3)``
on an input whose dim 1 is static.  The taken branch's nodes are then converted into the
enclosing graph, in order, by the importer's own walk (every converter, refusals kept opaque);
they read the enclosing scope's values by name, and the branch's outputs become the ``If``'s
outputs.  A branch's own initializers become constants; its nested subgraphs (an ``If`` inside
the branch) are handled alike.  A condition known only at run time (silero-vad's ``If`` on the
sample-rate input) is refused: the node stays an opaque ONNX node, run by ONNX Runtime.
"""

from __future__ import annotations

import onnx
import torch
import torch.fx as fx

from graphopt.errors import CaptureError
from graphopt.frontends.onnx.context import Ctx, ImportState
from graphopt.frontends.onnx.ops.opaque import outer_names
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.values import Sym, Value, tensor_from_proto


@converter("If")
def _if(ctx: Ctx) -> list[Value]:
    _check_tensor_outputs(ctx)
    taken = _condition(ctx)
    which = "then_branch" if taken else "else_branch"
    branch = ctx.attr(which)
    if not isinstance(branch, onnx.GraphProto):
        raise ctx.fail(f"the {which} attribute is missing")
    if len(branch.output) != len(ctx.node.output):
        raise ctx.fail(
            f"the {which} has {len(branch.output)} outputs, the node {len(ctx.node.output)}"
        )
    return inline_graph(ctx, branch, f"{ctx.name}/{which.removesuffix('_branch')}")


def _check_tensor_outputs(ctx: Ctx) -> None:
    """A sequence or optional output has no torch value, opaque or not (the export declares
    tensors): refuse the model at import, as a graph input of such a type is refused."""
    for which in ("then_branch", "else_branch"):
        branch = ctx.attr(which)
        for out in branch.output if isinstance(branch, onnx.GraphProto) else []:
            kind = out.type.WhichOneof("value")
            if kind not in (None, "tensor_type"):
                msg = str(
                    ctx.fail(
                        f"output {out.name!r} of the {which} is of "
                        f"{kind.removesuffix('_type')} type, not a tensor, which graphopt "
                        "cannot represent",
                        "Give the If tensor outputs (e.g. concatenate the sequence) and "
                        "re-export the model.",
                    )
                )
                raise CaptureError(msg)


def _condition(ctx: Ctx) -> bool:
    v = ctx.value(0)
    if isinstance(v, Sym) and all(isinstance(i, int | bool) for i in v.items):
        v = torch.tensor(v.items)
    if not isinstance(v, torch.Tensor):
        raise ctx.fail(
            f"the condition ({ctx.node.input[0]!r}) is computed at run time, so neither branch "
            "can be inlined"
        )
    if v.numel() != 1:
        raise ctx.fail(f"the condition has {v.numel()} elements, not one")
    return bool(v.reshape(-1)[0])


def inline_graph(ctx: Ctx, graph: onnx.GraphProto, prefix: str) -> list[Value]:
    """Convert ``graph``'s nodes into the graph under construction; its outputs' values."""
    imp = ctx.imp
    defined = [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output if o]
    if clash := [name for name in defined if name in imp.env]:
        raise ctx.fail(
            f"the branch redefines {clash[0]!r}, a name of the enclosing scope, which the "
            "importer's single namespace cannot hold"
        )
    if graph.sparse_initializer:
        raise ctx.fail("a branch with sparse initializers is not supported")
    for init in graph.initializer:
        tensor = tensor_from_proto(init)
        imp.env[init.name] = tensor
        imp.set_const_hint(tensor, init.name)
    _learn_types(imp, graph)
    for node in graph.node:
        for name in list(node.input) + outer_names(node):
            if name:
                imp.consumers[name] = imp.consumers.get(name, 0) + 1
    for out in graph.output:
        imp.consumers[out.name] = imp.consumers.get(out.name, 0) + 1
    for index, node in enumerate(graph.node):
        named = onnx.NodeProto()
        named.CopyFrom(node)
        named.name = f"{prefix}/{node.name or f'{node.op_type}_{index}'}"
        imp.convert_node(named, index)
    values = [imp.env[out.name] for out in graph.output]
    for value in values:
        if isinstance(value, fx.Node):
            value.meta.setdefault("onnx_node", ctx.name)
    return values


def _learn_types(imp: ImportState, graph: onnx.GraphProto) -> None:
    """Shapes and element types the branch declares, where shape inference gave none."""
    for vi in list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type and vi.name not in imp.elem_types:
            imp.elem_types[vi.name] = tt.elem_type
        if tt.HasField("shape") and vi.name not in imp.shapes:
            imp.shapes[vi.name] = [
                d.dim_value
                if d.HasField("dim_value")
                else (d.dim_param if d.HasField("dim_param") else None)
                for d in tt.shape.dim
            ]

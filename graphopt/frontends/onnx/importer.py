"""The graph walk: an ONNX model in, a ``torch.fx.GraphModule`` out.

``import_onnx(model)`` loads and checks the model, runs ONNX shape inference (a help, never a
requirement), turns initializers into constants and graph inputs into placeholders, then hands
every node, in order, to the converter that :data:`~graphopt.frontends.onnx.ops.CONVERTERS` maps
its op type to, and finally cleans up: dead code, unused submodules and buffers go.
"""

from __future__ import annotations

import logging

import onnx
import torch
import torch.fx as fx

from graphopt.errors import CaptureError
from graphopt.frontends.onnx.context import Ctx, ImportState, Refusal
from graphopt.frontends.onnx.load import ModelSource, load_onnx
from graphopt.frontends.onnx.ops import CONVERTERS, check_storage_dtypes, key
from graphopt.frontends.onnx.ops.opaque import opaque, outer_names
from graphopt.frontends.onnx.values import ONNX_TO_TORCH, Sym, tensor_from_proto

logger = logging.getLogger(__name__)


def import_onnx(model: ModelSource) -> fx.GraphModule:
    """Import an ONNX model (path, bytes or ModelProto) as a ``torch.fx.GraphModule``.

    Raises :class:`CaptureError` when the model cannot be loaded or uses an op, attribute value or
    runtime-dependent construct the importer does not support.
    """
    proto = load_onnx(model)
    return _Importer(proto).run()


class _Importer(ImportState):
    """Walks the ONNX graph in order, building the FX graph held by :class:`ImportState`."""

    def run(self) -> fx.GraphModule:
        g = self.model.graph
        self.collect_value_info(_with_inferred_shapes(self.model))
        self._count_consumers(g)
        self._add_initializers(g)
        input_names = [self._add_input(vi) for vi in g.input if vi.name not in self.env]
        for index, node in enumerate(g.node):
            self.convert_node(node, index)
        self._add_outputs(g)
        return self._finish(input_names)

    # -- static knowledge from shape inference -------------------------------------------

    def collect_value_info(self, model: onnx.ModelProto) -> None:
        self._collect_graph_info(model.graph)

    def _collect_graph_info(self, g: onnx.GraphProto) -> None:
        """Shapes and types of ``g``'s values and of its nodes' subgraphs (an inlined If
        branch reads them; ONNX names are unique across scopes)."""
        for node in g.node:
            for a in node.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                    self._collect_graph_info(sub)
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.elem_types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value
                    if d.HasField("dim_value")
                    else (d.dim_param if d.HasField("dim_param") else None)
                    for d in tt.shape.dim
                ]

    def _count_consumers(self, g: onnx.GraphProto) -> None:
        for node in g.node:
            for name in list(node.input) + outer_names(node):  # a branch's reads count too
                if name:
                    self.consumers[name] = self.consumers.get(name, 0) + 1
        for out in g.output:
            self.consumers[out.name] = self.consumers.get(out.name, 0) + 1

    # -- graph inputs --------------------------------------------------------------------

    def _add_initializers(self, g: onnx.GraphProto) -> None:
        for init in g.initializer:
            try:
                t = tensor_from_proto(init)
            except Exception as exc:
                raise CaptureError(
                    f"Initializer {init.name!r} cannot be converted to a torch tensor: {exc}. "
                    f"Convert it to a supported dtype before importing."
                ) from exc
            self.env[init.name] = t
            self.set_const_hint(t, init.name)

    def _add_input(self, vi: onnx.ValueInfoProto) -> str:
        """A placeholder for a graph input (an initializer listed as an input, as old IR
        versions do, is a constant and gets none)."""
        target = self.unique_name(vi.name, "input")
        ph = self.graph.placeholder(target)
        ph.meta["onnx_name"] = vi.name
        ph.meta["onnx_shape"] = self.shapes.get(vi.name)
        elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
        ph.meta["onnx_elem_type"] = elem
        ph.meta["onnx_dtype"] = ONNX_TO_TORCH.get(elem)
        kind = vi.type.WhichOneof("value")
        if kind not in (None, "tensor_type"):  # a sequence, optional or map: no torch tensor
            raise CaptureError(
                f"ONNX graph input {vi.name!r} (read by {self._readers(vi.name)}) is of "
                f"{kind.removesuffix('_type')} type, not a tensor; graphopt's importer takes "
                f"tensor inputs only. Give the model tensor inputs and re-export it."
            )
        if elem and ph.meta["onnx_dtype"] is None:  # int4, string, ...: no torch tensor
            raise CaptureError(
                f"ONNX graph input {vi.name!r} (read by {self._readers(vi.name)}) has element "
                f"type {onnx.TensorProto.DataType.Name(elem)}, which has no torch dtype, so "
                f"graphopt's importer cannot represent it. Give the model an input of a "
                f"supported type (e.g. int8 or float32, with a Cast inside the model) and "
                f"re-export it."
            )
        self.env[vi.name] = ph
        return vi.name

    def _readers(self, name: str) -> str:
        """The nodes that read ``name``, for messages: "Cast node 'Cast_0'", ..."""
        readers = [
            f"{node.op_type} node {node.name or f'{node.op_type}_{i}'!r}"
            for i, node in enumerate(self.model.graph.node)
            if name in node.input
        ]
        return ", ".join(readers) or "no node"

    # -- nodes and outputs ---------------------------------------------------------------

    def convert_node(self, node: onnx.NodeProto, index: int) -> None:
        ctx = Ctx(self, node, index)
        convert = CONVERTERS.get(key(node))
        try:
            if convert is None:
                result = opaque(ctx, f"no converter for {_label(node)}")
            else:
                check_storage_dtypes(ctx)
                result = convert(ctx)
        except Refusal as exc:  # a converter's refusal: the node stays an ONNX node
            logger.info("ONNX node %r stays opaque: %s", ctx.name, exc)
            result = opaque(ctx, str(exc))
        except CaptureError:
            raise
        except Exception as exc:
            raise CaptureError(
                f"Converting ONNX node {ctx.name!r} (op type {node.op_type!r}) failed: "
                f"{type(exc).__name__}: {exc}. The node's attributes or input shapes are "
                f"probably outside what graphopt's importer handles; please report it with "
                f"the model."
            ) from exc
        outputs = result if isinstance(result, list) else [result]
        for name, value in zip(node.output, outputs, strict=False):
            if name:
                self.env[name] = value
                if isinstance(value, torch.Tensor):
                    self.set_const_hint(value, name)
                elif isinstance(value, fx.Node):
                    value.meta.setdefault("onnx_node", ctx.name)

    def _add_outputs(self, g: onnx.GraphProto) -> None:
        results: list[fx.Node] = []
        for out in g.output:
            value = self.env[out.name]
            if isinstance(value, Sym):
                value = self.sym_to_tensor(value)
            if isinstance(value, torch.Tensor):
                value = self.const_node(value)
            results.append(value)
        self.graph.output(results[0] if len(results) == 1 else tuple(results))

    def _finish(self, input_names: list[str]) -> fx.GraphModule:
        g = self.model.graph
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxGraphModule")
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in [b for b, _ in gm.named_buffers(recurse=False) if b not in used]:
            delattr(gm, name)
        gm.graph.lint()
        gm.recompile()
        gm.meta["onnx_input_names"] = input_names
        gm.meta["onnx_output_names"] = [o.name for o in g.output]
        gm.meta["onnx_output_shapes"] = [self.shapes.get(o.name) for o in g.output]
        gm.meta["onnx_opset"] = self.opset
        gm.meta["onnx_opaque"] = dict(self.opaque)
        # the output node carries the names too: graph passes copy nodes' meta, not gm.meta
        output_node = next(n for n in gm.graph.nodes if n.op == "output")
        output_node.meta["onnx_output_names"] = list(gm.meta["onnx_output_names"])
        return gm.eval()  # an ONNX graph is an inference graph (BatchNorm, Dropout)


def _with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # shape inference is a help, never a requirement
        logger.warning("ONNX shape inference failed (%s); importing without static shapes", exc)
        return model


def _label(node: onnx.NodeProto) -> str:
    domain = node.domain if node.domain not in ("", "ai.onnx") else "ai.onnx"
    return f"{domain}::{node.op_type}"

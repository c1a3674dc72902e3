"""The graph under construction and one ONNX node's view of it.

:class:`ImportState` holds the FX graph being built, its root module (submodules and constant
buffers) and the ONNX-name -> value environment.  :class:`Ctx` is what a converter receives: the
node, its attributes and inputs, and helpers that emit FX nodes -- each of which evaluates right
away when no argument is an FX node, so constant subgraphs are folded at import.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import nn

from graphopt.errors import CaptureError
from graphopt.frontends.onnx.values import ONNX_TO_TORCH, Sym, Value


def _has_node(obj: Any) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        found = found or isinstance(a, fx.Node)
        return a

    fx.node.map_aggregate(obj, visit)
    return found


def _sanitize(name: str, default: str) -> str:
    """A valid Python identifier derived from an ONNX name."""
    s = re.sub(r"\W", "_", name)
    s = re.sub(r"_+", "_", s).strip("_")
    if not s:
        s = default
    if s[0].isdigit():
        s = f"{default}_{s}"
    if keyword.iskeyword(s):
        s += "_"
    return s


# Called from generated code: a shape value (Sym) that reaches a runtime op becomes a tensor.
def _dims_to_tensor(dims: list[Any], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A 1-D tensor from a list of ints / size values (traces dynamically)."""
    return torch.stack([torch.as_tensor(d, dtype=torch.int64) for d in dims]).to(dtype)


def _dim_to_tensor(dim: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.as_tensor(dim, dtype=torch.int64).to(dtype)


class Refusal(CaptureError):
    """A converter's refusal of a node (an attribute value or a runtime input it does not
    handle): the importer then keeps the node as an opaque ONNX node."""


class ImportState:
    """Holds the FX graph under construction and the ONNX-name -> value environment."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = 1
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = imp.version
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self.shapes: dict[str, list[int | str | None] | None] = {}
        self.elem_types: dict[str, int] = {}
        self.consumers: dict[str, int] = {}
        self._names: set[str] = set()
        self._const_hint: dict[int, str] = {}
        self._const_nodes: dict[int, tuple[torch.Tensor, fx.Node]] = {}
        self._size_nodes: dict[tuple[fx.Node, int], fx.Node] = {}
        # Linear nodes (from MatMul) whose only consumer may absorb an Add of a bias.
        self.bias_fusable: dict[fx.Node, nn.Linear] = {}
        # opaque nodes (kept as ONNX nodes, see ops/opaque.py): node name -> why
        self.opaque: dict[str, str] = {}

    def convert_node(self, node: onnx.NodeProto, index: int) -> None:
        """Convert one ONNX node into the graph (the importer's walk; an If inlines its taken
        branch with it)."""
        raise NotImplementedError

    # -- names and constants -------------------------------------------------------------

    def unique_name(self, hint: str, default: str) -> str:
        base = _sanitize(hint, default)
        name, k = base, 1
        while name in self._names or hasattr(self.root, name) or hasattr(fx.GraphModule, name):
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def set_const_hint(self, tensor: torch.Tensor, name: str) -> None:
        self._const_hint.setdefault(id(tensor), name)

    def const_node(self, tensor: torch.Tensor) -> fx.Node:
        """A get_attr node reading ``tensor`` as a buffer of the root module."""
        entry = self._const_nodes.get(id(tensor))
        if entry is not None:
            return entry[1]
        name = self.unique_name(self._const_hint.get(id(tensor), "const"), "const")
        self.root.register_buffer(name, tensor.detach().contiguous())
        node = self.graph.get_attr(name)
        self._const_nodes[id(tensor)] = (tensor, node)  # keep the tensor alive: ids stay unique
        return node

    def size_node(self, x: fx.Node, dim: int) -> fx.Node:
        key = (x, dim)
        if key not in self._size_nodes:
            self._size_nodes[key] = self.graph.call_method("size", (x, dim))
        return self._size_nodes[key]

    def lift(self, obj: Any) -> Any:
        """Replace constants (tensors) in an argument structure by get_attr nodes."""

        def visit(a: Any) -> Any:
            if isinstance(a, Sym):
                raise AssertionError("shape values must be materialized before emitting")
            return self.const_node(a) if isinstance(a, torch.Tensor) else a

        return fx.node.map_aggregate(obj, visit)

    def sym_to_tensor(self, sym: Sym) -> Value:
        if sym.scalar:
            return self.graph.call_function(_dim_to_tensor, (sym.items[0], sym.dtype))
        return self.graph.call_function(_dims_to_tensor, (list(sym.items), sym.dtype))

    def distrust_shapes_after(self, name: str, shape: list[int | str | None]) -> None:
        """Set the shape of ``name`` and forget static dims of every value computed from it.

        Used where ONNX shape inference is known to be wrong; ranks are kept, and dims of
        downstream values are then read at run time (``x.size(i)``) instead.
        """
        self.shapes[name] = shape
        tainted = {name}
        for node in self.model.graph.node:
            if not tainted.intersection(node.input):
                continue
            for out in node.output:
                if out and out not in tainted:
                    tainted.add(out)
                    known = self.shapes.get(out)
                    if known is not None:
                        self.shapes[out] = [None if isinstance(d, int) else d for d in known]


class Ctx:
    """One ONNX node being converted: its inputs, attributes and helpers that emit FX nodes."""

    def __init__(self, imp: ImportState, node: onnx.NodeProto, index: int) -> None:
        self.imp = imp
        self.node = node
        self.op = node.op_type
        self.name = node.name or f"{node.op_type}_{index}"
        self.opset = imp.opset
        self.attrs: dict[str, Any] = {}
        for a in node.attribute:
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            self.attrs[a.name] = value

    # -- errors and attributes -------------------------------------------------------------

    def fail(self, what: str, fix: str = "") -> Refusal:
        msg = f"ONNX node {self.name!r} ({self.op}): {what}."
        if fix:
            msg += f" {fix}"
        return Refusal(msg)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    # -- inputs --------------------------------------------------------------------------

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def value(self, i: int) -> Value | None:
        return self.imp.env[self.node.input[i]] if self.has(i) else None

    def const(self, i: int) -> torch.Tensor | None:
        """Input ``i`` as a constant tensor, or None when absent or known only at run time."""
        v = self.value(i)
        return v if isinstance(v, torch.Tensor) else None

    def const_ints(self, i: int, what: str) -> list[int] | None:
        """Input ``i`` as a list of ints (None when absent); it must be constant."""
        if not self.has(i):
            return None
        v = self.value(i)
        if not isinstance(v, torch.Tensor):
            raise self.fail(
                f"input {what!r} ({self.node.input[i]!r}) must be a constant, but it "
                f"is computed at run time",
                "Export the model with constant folding so it becomes constant.",
            )
        return [int(d) for d in v.reshape(-1).tolist()]

    def tensor(self, i: int) -> torch.Tensor | fx.Node:
        """Input ``i`` as a constant tensor or a runtime node (shape values materialized)."""
        v = self.value(i)
        if v is None:
            raise self.fail(f"required input {i} is missing")
        return self.materialize(v)

    def materialize(self, v: Value) -> torch.Tensor | fx.Node:
        return self.imp.sym_to_tensor(v) if isinstance(v, Sym) else v

    def shape(self, i: int) -> list[int | str | None] | None:
        """The statically inferred shape of input ``i`` (None when unknown)."""
        v = self.value(i)
        if isinstance(v, torch.Tensor):
            return list(v.shape)
        if isinstance(v, Sym):
            return [] if v.scalar else [len(v.items)]
        return self.imp.shapes.get(self.node.input[i]) if self.has(i) else None

    def rank(self, i: int) -> int | None:
        s = self.shape(i)
        return None if s is None else len(s)

    def static_dim(self, i: int, axis: int) -> int | None:
        s = self.shape(i)
        if s is None or not -len(s) <= axis < len(s):
            return None
        d = s[axis]
        return d if isinstance(d, int) else None

    def dtype(self, i: int) -> torch.dtype | None:
        v = self.value(i)
        if isinstance(v, torch.Tensor):
            return v.dtype
        if isinstance(v, Sym):
            return v.dtype
        return (
            ONNX_TO_TORCH.get(self.imp.elem_types.get(self.node.input[i], 0))
            if self.has(i)
            else None
        )

    def output_used(self, j: int) -> bool:
        return (
            j < len(self.node.output)
            and self.node.output[j] != ""
            and self.imp.consumers.get(self.node.output[j], 0) > 0
        )

    def dims_of(self, i: int) -> list[int | fx.Node] | None:
        """Per-dim sizes of input ``i``: static ints where known, ``x.size(d)`` nodes otherwise."""
        v = self.value(i)
        if isinstance(v, torch.Tensor):
            return list(v.shape)
        s = self.shape(i)
        if s is None or not isinstance(v, fx.Node):
            return None
        return [d if isinstance(d, int) else self.imp.size_node(v, k) for k, d in enumerate(s)]

    # -- emitting ------------------------------------------------------------------------

    def _emit(self, kind: str, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not _has_node((args, kwargs)):
            with torch.no_grad():
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return self.imp.root.get_submodule(target)(*args, **kwargs)
        node = self.imp.graph.create_node(kind, target, self.imp.lift(args), self.imp.lift(kwargs))
        node.meta["onnx_node"] = self.name
        node.meta["onnx_op"] = self.op
        return node

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Emit ``fn(*args, **kwargs)``, or evaluate it now when every argument is constant."""
        return self._emit("call_function", fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._emit("call_method", name, args, kwargs)

    def module(self, mod: nn.Module, *args: Any) -> Any:
        """Register ``mod`` as a submodule named after this node and call it."""
        mod.eval()
        if not _has_node(args):
            with torch.no_grad():
                return mod(*args)
        target = self.imp.unique_name(self.name, self.op.lower())
        self.imp.root.add_module(target, mod)
        return self._emit("call_module", target, args, {})

    def size_tensor(self, v: int | fx.Node) -> Any:
        """A slice bound for ``runtime.slice_onnx``: an int, or a size node as a 0-D tensor at
        run time."""
        return v if isinstance(v, int) else self.call(_dim_to_tensor, v)

"""Canonical IR printing, IR diffs and graph fingerprints.

Canonical IR names values by position (``%0``, ``%1``...), prints modules by their type and
hyper-parameters instead of their attribute path, and elides constants to their dtype and shape,
so two graphs that compute the same thing in the same order print the same, whatever their
modules are called. It is what Before/Expected tests compare and what ``--print-ir`` shows.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx

if TYPE_CHECKING:
    pass

_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
}


def short_dtype(dtype: torch.dtype | None) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", "")) if dtype else "?"


def _tensor_type(t: torch.Tensor) -> str:
    return f"{short_dtype(t.dtype)}[{','.join(str(d) for d in t.shape)}]"


def _node_type(node: fx.Node) -> str:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return ""
    return f" : {short_dtype(meta.dtype)}[{','.join(str(d) for d in meta.shape)}]"


def _callable_name(fn: Any) -> str:
    if isinstance(fn, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(fn)
    if fn in vars(operator).values():
        return f"operator.{fn.__name__}"
    module = getattr(fn, "__module__", "") or ""
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


def _module_text(module: torch.nn.Module) -> str:
    return f"{type(module).__name__}({module.extra_repr()})"


def _constant_text(value: Any, elide: bool) -> str:
    if isinstance(value, torch.nn.Module):  # a module handed to a function (tune-conv-bn)
        return f"module {_module_text(value)}"
    if isinstance(value, torch.Tensor):
        if elide:
            return f"const {_tensor_type(value)}"
        digest = hashlib.blake2b(
            value.detach().cpu().contiguous().numpy().tobytes(), digest_size=6
        ).hexdigest()
        return f"const {_tensor_type(value)} #{digest}"
    return f"const {type(value).__name__}"


def canonical_ir(gm: fx.GraphModule, *, elide_constants: bool = True, types: bool = False) -> str:
    """Print ``gm`` in canonical form: positional names, modules by kind, constants elided.

    ``types=True`` adds ``: f32[1,3,8,8]`` from shape metadata where the capture recorded it.
    """
    names: dict[fx.Node, str] = {}
    lines: list[str] = []

    def arg(a: Any) -> str:
        if isinstance(a, fx.Node):
            return names[a]
        if isinstance(a, tuple | list):
            inner = ", ".join(arg(x) for x in a)
            return f"({inner})" if isinstance(a, tuple) else f"[{inner}]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, torch.dtype):
            return short_dtype(a)
        if isinstance(a, float) and math.isfinite(a):
            return repr(round(a, 8))
        return repr(a)

    def call(head: str, node: fx.Node) -> str:
        parts = [arg(a) for a in node.args]
        parts += [f"{k}={arg(v)}" for k, v in sorted(node.kwargs.items())]
        return f"{head}({', '.join(parts)})"

    counter = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = f"%in{len([n for n in names.values() if n.startswith('%in')])}"
            lines.append(f"{names[node]} = input{_node_type(node) if types else ''}")
            continue
        if node.op == "output":
            lines.append(f"return {arg(node.args[0])}")
            continue
        names[node] = f"%{counter}"
        counter += 1
        if node.op == "call_module":
            head = _module_text(gm.get_submodule(node.target))
        elif node.op == "call_function":
            head = _callable_name(node.target)
        elif node.op == "call_method":
            head = f".{node.target}"
        else:  # get_attr
            value = fetch_attr(gm, node.target)
            text = _constant_text(value, elide_constants)
            lines.append(f"{names[node]} = {text}")
            continue
        lines.append(f"{names[node]} = {call(head, node)}{_node_type(node) if types else ''}")
    return "\n".join(lines) + "\n"


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """The object a ``get_attr`` target names (``"layer1.conv.weight"``); AttributeError if a
    part is missing. (Here, below :mod:`graphopt.fx`, because printing reads constants too;
    :mod:`graphopt.fx.names` re-exports it.)"""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def ir_diff(before: str, after: str, *, context: int = 2) -> str:
    """A unified diff of two canonical IR texts ('' when equal)."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(True), after.splitlines(True), "before", "after", n=context
        )
    )


def fingerprint(gm: torch.nn.Module, *, weights: bool = True) -> str:
    """A stable hash of a graph's structure (and, with ``weights``, of every parameter's bytes).

    Two captures of the same model give the same fingerprint; any rewrite changes it.
    """
    h = hashlib.blake2b(digest_size=16)
    if isinstance(gm, fx.GraphModule):
        h.update(canonical_ir(gm, elide_constants=True).encode())
    else:
        h.update(repr(gm).encode())
    if weights:
        for name, t in sorted(_named_tensors(gm)):
            h.update(name.encode())
            h.update(_tensor_type(t).encode())
            h.update(
                np.ascontiguousarray(
                    t.detach().cpu().float().numpy()
                    if t.dtype == torch.bfloat16
                    else t.detach().cpu().numpy()
                ).tobytes()
            )
    return h.hexdigest()


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = list(module.named_parameters(remove_duplicate=False))
    out += list(module.named_buffers(remove_duplicate=False))
    return out

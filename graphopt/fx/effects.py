"""The in-place rule, once for every pass: which nodes write, what their writes reach.

FX's own purity check misses in-place ops (``y.add_(1)``, ``F.relu(y, inplace=True)``,
``nn.ReLU(inplace=True)``), whose result is often unused while their effect is not. Here:
:func:`mutates_input` (does a node write?), :func:`is_impure` (must it stay without users?),
:func:`remove_dead_nodes` (dead-code removal that keeps them), :func:`written_in_place` (which
values do the graph's writes reach, through views and aliases), :func:`written_storages` (which
attribute tensors, by memory, so tied weights count too) and :func:`may_alias_input`.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import operator

import torch
from torch import fx, nn

from graphopt.fx.names import fetch_attr
from graphopt.fx.uses import detach_static_reads


def is_impure(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` must stay even when nothing reads its value: FX's own rule (placeholders,
    the output, calls it knows to have side effects) or an in-place op (:func:`mutates_input`)."""
    return node.is_impure() or mutates_input(gm, node)


def remove_dead_nodes(gm: fx.GraphModule) -> int:
    """Erase the nodes of ``gm`` whose values nothing uses and that have no effect; the number
    erased. Every pass that cleans up after itself calls this, never
    ``gm.graph.eliminate_dead_code()`` bare: FX's purity check misses in-place ops
    (``y.add_(1)``, ``F.relu(y, inplace=True)``, ``nn.ReLU(inplace=True)``), whose result is
    often unused while their effect is not. A value read only by guards on its rank or dtype
    (``torch._assert(x.ndim == 4)``) is dead too: those reads become the constants the capture
    recorded (:func:`graphopt.fx.uses.detach_static_reads`)."""
    before = len(gm.graph.nodes)
    detach_static_reads(gm)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(gm, n))
    return before - len(gm.graph.nodes)


def mutates_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` writes to one of its inputs (an in-place op), so it must stay without users."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if _out_nodes(node):
        return True  # torch.add(a, b, out=c) writes c
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        if node.target in _WRITING_OPERATORS:
            return True
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            return True  # aten.copy_.default, aten.add.out, _native_batch_norm_legit (stats)
        name = getattr(node.target, "__name__", "")
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            if bound.arguments.get("inplace") is True:  # F.relu(x, True), F.dropout(...)
                return True
        except (TypeError, ValueError):
            pass  # builtins without a signature
    else:
        return False
    if node.kwargs.get("inplace") is True:
        return True
    if name in _WRITING_DUNDERS:  # x.__setitem__(i, v), x.__iadd__(y)
        return True
    return name.endswith("_") and not name.startswith("__")  # add_, relu_, copy_, ...


# operator.setitem(x, i, v); operator.iadd(x, y) is x += y, in place on a tensor
_WRITING_OPERATORS = {operator.setitem, operator.delitem, operator.iadd, operator.isub}
_WRITING_OPERATORS |= {operator.imul, operator.itruediv, operator.ifloordiv, operator.imod}
_WRITING_OPERATORS |= {operator.ipow, operator.imatmul, operator.iand, operator.ior}
_WRITING_OPERATORS |= {operator.ixor, operator.ilshift, operator.irshift}
_WRITING_DUNDERS = {f"__{op.__name__}__" for op in _WRITING_OPERATORS}


def written_in_place(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose values some in-place op of ``gm`` writes to: each write's target
    (``self`` of ``c.add_(1)``, ``out=``, a schema's ``Tensor(a!)`` arguments) and every tensor
    it may be a view of, back to where the memory was made (a ``get_attr``, a placeholder, an op
    that returns a new tensor): ``self.buf.view(-1)[0] = 1`` writes ``self.buf``. Conservative:
    a conversion that may return its input (``x.float()``, ``x.to(...)``) counts as a view."""
    written: set[fx.Node] = set()
    stack = [w for n in gm.graph.nodes if mutates_input(gm, n) for w in _written_operands(n)]
    while stack:
        node = stack.pop()
        if node in written:
            continue
        written.add(node)
        if may_alias_input(gm, node) and node.args:
            fx.node.map_arg(node.args[0], stack.append)
    return written


def written_storages(gm: fx.GraphModule, written: set[fx.Node] | None = None) -> set[int]:
    """The memory (storage addresses, see :func:`storage_key`) of the attribute tensors that an
    in-place op of ``gm`` writes (``written``: :func:`written_in_place`, computed if not given).
    Compare by memory, not by name: two attributes can share it (tied weights, a buffer that
    is a view of another)."""
    written = written_in_place(gm) if written is None else written
    keys = set()
    for node in written:
        if node.op != "get_attr":
            continue
        try:
            obj = fetch_attr(gm, node.target)
        except AttributeError:  # an attribute the graph names but the module lacks
            continue
        if isinstance(obj, torch.Tensor) and (key := storage_key(obj)) is not None:
            keys.add(key)
    return keys


def storage_key(t: torch.Tensor) -> int | None:
    """Where ``t``'s memory lives (None for an empty tensor, which no write can change)."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return id(t)
    return storage.data_ptr() if storage.nbytes() else None


def _out_nodes(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(node.kwargs.get("out"), out.append)
    return out


def _written_operands(node: fx.Node) -> list[fx.Node]:
    """The inputs an in-place ``node`` writes to (it is known to write one)."""
    found: list[fx.Node] = []
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            fx.node.map_arg(value, found.append)
        if found:
            return found
    found = _out_nodes(node)
    if node.args:
        fx.node.map_arg(node.args[0], found.append)  # self, setitem's target, inplace=True
    return found


# Ops whose result may share memory with their first operand beyond what aten schemas say
# (Python-level methods with no aten op of their name, and composites that return their input
# unchanged: ``x.float()`` of a float tensor, dropout in eval mode, ``x[1:]``, ``x.data``).
_MAY_RETURN_INPUT = {"getitem", "__getitem__", "getattr", "type_as", "type", "float", "double"}
_MAY_RETURN_INPUT |= {"half", "bfloat16", "int", "long", "short", "char", "byte", "bool"}
_MAY_RETURN_INPUT |= {"cpu", "cuda", "dropout", "feature_dropout", "alpha_dropout"}
_MAY_RETURN_INPUT |= {"feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def may_alias_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node``'s value may share memory with its first operand: a view (by the aten schema of
    the op or of the op of that name: ``Tensor(a)``), an in-place op (it returns what it
    wrote) or a call that may return its input as it is."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _VIEW_MODULES) or mutates_input(gm, node)
    if node.op not in ("call_method", "call_function"):
        return False
    if mutates_input(gm, node):
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        returns = target._schema.returns
        return bool(returns) and returns[0].alias_info is not None
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name in _MAY_RETURN_INPUT or _aten_view(name) or target is builtins.getattr


@functools.cache
def _aten_view(name: str) -> bool:
    """An aten op named ``name`` has a non-mutating overload returning a view (``Tensor(a)``)."""
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    for overload in packet.overloads():
        schema = getattr(packet, overload)._schema
        returns = schema.returns
        if not schema.is_mutable and returns and returns[0].alias_info is not None:
            return True
    return False


def shares_storage(keys: set[int], *tensors: torch.Tensor | None) -> bool:
    """One of ``tensors`` lives in memory among ``keys`` (:func:`written_storages`): ``forward``
    writes it in place, directly or through a tensor sharing its memory."""
    return any(t is not None and storage_key(t) in keys for t in tensors)

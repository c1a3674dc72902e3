"""Who uses a value, and how: value users vs metadata users, once for every pass.

A guard such as ``torch._assert(x.ndim == 4, ...)`` (timm's ``BatchNormAct2d``), a read of
``x.shape`` / ``x.size(1)`` / ``x.dim()`` / ``x.dtype`` for shape arithmetic, ``x`` as the shape
template of ``y.reshape_as(x)``, reads ``x``'s *metadata*, never its values. A pass asking "is
this output used elsewhere?" (fold a BN into the conv before it, merge branches, equalize a
pair) asks about :func:`value_users`: a rewrite that keeps a value's shape, rank and dtype
(every exact pass here) keeps every metadata read valid.

When a rewrite drops a value whose metadata is still read, :func:`redirect_metadata_reads`
moves those reads onto the value that replaces it (same shape and dtype), and
:func:`detach_static_reads` (called by dead-code removal) turns the reads that only need the
rank or the dtype recorded at capture (``ndim``, ``dim()``, ``dtype``) into constants, so that a
guard alone never keeps a dropped computation alive. Shape reads of a dropped value (the batch
may vary) are left as they are: the value then stays computed, correct but not free.
"""

from __future__ import annotations

import builtins

import torch
from torch import fx

aten = torch.ops.aten

# x.<attr>: metadata, and (STATIC) known from the captured tensor_meta for any batch size
METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse"}
METADATA_ATTRS |= {"is_quantized", "is_meta"}
METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device"}
METADATA_METHODS |= {"is_floating_point", "is_complex", "element_size"}
METADATA_FUNCTIONS = {torch.numel, torch.is_floating_point, torch.is_complex}
METADATA_FUNCTIONS |= {aten.sym_size.int, aten.sym_numel.default, aten.dim.default}
# y.reshape_as(x): x only a shape template (timm's LinearNorm: bn(x.flatten(0, 1)).reshape_as(x))
TEMPLATE_METHODS = {"reshape_as", "view_as", "expand_as"}
_STATIC_ATTRS = {"ndim": lambda m: len(m.shape), "dtype": lambda m: m.dtype}
_STATIC_METHODS = {
    "dim": lambda m: len(m.shape),
    "ndimension": lambda m: len(m.shape),
    "is_floating_point": lambda m: m.dtype.is_floating_point,
    "is_complex": lambda m: m.dtype.is_complex,
    "element_size": lambda m: m.dtype.itemsize,
}


def is_metadata_read(user: fx.Node, of: fx.Node) -> bool:
    """``user`` reads only the metadata of ``of`` (shape, rank, dtype, device), never its
    values: ``getattr(of, 'shape')``, ``of.size(1)``, ``of.dim()``, ``torch.numel(of)``, and
    ``of`` as the shape template of ``y.reshape_as(of)`` / ``view_as`` / ``expand_as``."""
    if _is_shape_template(user, of):
        return True
    if not user.args or user.args[0] is not of or of in _other_operands(user):
        return False
    if user.op == "call_function" and user.target is builtins.getattr:
        return len(user.args) == 2 and user.args[1] in METADATA_ATTRS
    if user.op == "call_method":
        return user.target in METADATA_METHODS
    return user.op == "call_function" and user.target in METADATA_FUNCTIONS


def _is_shape_template(user: fx.Node, of: fx.Node) -> bool:
    return (
        user.op == "call_method"
        and user.target in TEMPLATE_METHODS
        and len(user.args) == 2
        and user.args[1] is of
        and user.args[0] is not of
        and not user.kwargs
    )


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (every user but the metadata reads)."""
    return [u for u in node.users if not is_metadata_read(u, node)]


def metadata_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read only its metadata (guards, shape arithmetic)."""
    return [u for u in node.users if is_metadata_read(u, node)]


def sole_value_user(node: fx.Node) -> fx.Node | None:
    """The one user reading ``node``'s values, or None (none or several)."""
    users = value_users(node)
    return users[0] if len(users) == 1 else None


def redirect_metadata_reads(node: fx.Node, to: fx.Node) -> None:
    """Make ``node``'s metadata reads read ``to`` instead. The caller promises that ``to`` has
    ``node``'s shape, rank and dtype for every input (a folded or merged replacement does)."""
    for user in metadata_users(node):
        user.replace_input_with(node, to)


def detach_static_reads(gm: fx.GraphModule) -> int:
    """Replace every read of a rank or dtype (``x.ndim``, ``x.dim()``, ``x.dtype``) of a value
    nothing else reads by the constant its ``tensor_meta`` records (the rank and dtype of a
    captured graph's values do not depend on the batch size); the number replaced. The value
    can then be removed as dead. Reads of values still used, and shape reads, stay."""
    replaced = 0
    for node in list(gm.graph.nodes):
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        if not hasattr(meta, "shape") or not hasattr(meta, "dtype") or value_users(node):
            continue
        for user in metadata_users(node):
            value = _static_value(user, meta)
            if value is _UNKNOWN:
                continue
            for reader in list(user.users):
                reader.args = fx.node.map_arg(reader.args, lambda n, u=user, v=value: _sub(n, u, v))
                reader.kwargs = fx.node.map_arg(
                    reader.kwargs, lambda n, u=user, v=value: _sub(n, u, v)
                )
            replaced += 1
    return replaced


_UNKNOWN = object()


def _static_value(user: fx.Node, meta) -> object:
    if user.op == "call_function" and user.target is builtins.getattr:
        rule = _STATIC_ATTRS.get(user.args[1])
        return rule(meta) if rule is not None else _UNKNOWN
    if user.op == "call_method" and len(user.args) == 1 and not user.kwargs:
        rule = _STATIC_METHODS.get(user.target)
        return rule(meta) if rule is not None else _UNKNOWN
    return _UNKNOWN


def _sub(n: fx.Node, old: fx.Node, value: object) -> object:
    return value if n is old else n


def _other_operands(user: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((user.args[1:], user.kwargs), found.append)
    return found

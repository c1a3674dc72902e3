"""Capture's binding of ``forward``'s arguments: those with a default that no example input
gives are traced as constants (``concrete_args``), and the placeholders torch.fx keeps for them
are dropped, so they are not inputs of the captured graph."""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import fx, nn


def bound_defaults(
    model: nn.Module, given: int | None, concrete_args: dict[str, Any] | None
) -> dict[str, Any]:
    """``concrete_args`` plus every argument of ``forward`` that has a default and is not among
    the ``given`` example inputs, bound to its default (``attn_mask=None``, ``is_causal=False``
    in timm's attention): traced as constants, not graph inputs. ``given`` None: only the
    arguments without a default are inputs."""
    bound = dict(concrete_args or {})
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature
        return bound
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for i, p in enumerate(params):
        if p.kind not in kinds or p.default is inspect.Parameter.empty or p.name in bound:
            continue
        if given is None or i >= given:
            bound[p.name] = p.default
    return bound


def drop_bound_placeholders(graph: fx.Graph, names: set[str]) -> None:
    """Remove the placeholders torch.fx keeps for ``concrete_args`` (with its checks that the
    caller passes the traced value: ``_assert_is_none(a)``, ``_assert(a == v)``), so they are not
    inputs of the captured graph. A placeholder something else reads stays."""
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        if not _placeholder_names(node) & names:
            continue
        checks = _specialization_checks(node)
        if checks is None:
            continue
        for check in reversed(checks):
            graph.erase_node(check)
        graph.erase_node(node)


def _placeholder_names(node: fx.Node) -> set[str]:
    """The arguments a placeholder may stand for (torch.fx renames bound ones ``name_1``)."""
    base, _, suffix = node.target.rpartition("_")
    return {node.target, base} if base and suffix.isdigit() else {node.target}


def _specialization_checks(node: fx.Node) -> list[fx.Node] | None:
    """The nodes that only check a bound placeholder's value, in graph order; None if anything
    else reads it."""
    checks: list[fx.Node] = []
    for user in node.users:
        if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none":
            checks.append(user)
            continue
        asserts = list(user.users)
        if user.target is not operator.eq or not all(a.target is torch._assert for a in asserts):
            return None
        checks += [user, *asserts]
    return sorted(checks, key=_position(node.graph))


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__

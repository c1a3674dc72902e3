"""The table of converters: ONNX op -> the function that converts such a node.

Ops of the default domain (``""`` / ``ai.onnx``) are keyed by their op type (``"Conv"``); ops of
another domain by ``"<domain>::<op type>"`` (``"com.microsoft::Gelu"``). :func:`key` gives a
node's key; a node whose key is not in the table stays an opaque ONNX node.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.values import Value

Converter = Callable[[Ctx], Value | list[Value]]
CONVERTERS: dict[str, Converter] = {}
DEFAULT_DOMAINS = ("", "ai.onnx")


def op_key(op_type: str, domain: str = "") -> str:
    """The table's key of an op: its type in the default domain, ``domain::type`` elsewhere."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}::{op_type}"


def key(node: onnx.NodeProto) -> str:
    return op_key(node.op_type, node.domain)


def converter(*op_types: str, domain: str = "") -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of ``op_types`` (of ``domain``)."""

    def register(fn: Converter) -> Converter:
        for op in op_types:
            CONVERTERS[op_key(op, domain)] = fn
        return fn

    return register

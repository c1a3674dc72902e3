"""The table of converters: ONNX op type -> the function that converts such a node."""

from __future__ import annotations

from collections.abc import Callable

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.values import Value

Converter = Callable[[Ctx], Value | list[Value]]
CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for op in op_types:
            CONVERTERS[op] = fn
        return fn

    return register

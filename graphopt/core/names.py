"""One naming scheme for layers in every report: the PyTorch module path (``layer1.0.conv1``).

graphopt's export names an ONNX node after the modules it ran in, as ``torch.onnx.export``
does (``/layer1/layer1.0/conv1/Conv``: each scope is a module, named by its path from the last
non-numeric atom, then the op); the int8 stage's decisions are about those nodes. An FX node
that calls a module has the path as its target (``layer1.0.conv1``), where its own name is
``layer1_0_conv1``. Names of another origin (a user's ONNX file) are kept as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["decision_dict", "layer_name"]


def layer_name(name: str) -> str:
    """The module path of an exported ONNX node's name: ``/layer1/layer1.0/conv1/Conv`` ->
    ``layer1.0.conv1``; ``/blocks/blocks.0/attn/MatMul_1`` -> ``blocks.0.attn``. A name that is
    not a scope path (a user's ONNX file, ``/Conv`` at the top level) is returned unchanged.

    >>> layer_name("/features/features.0/features.0.0/Conv")
    'features.0.0'
    """
    if not name.startswith("/"):
        return name
    scopes = name.split("/")[1:-1]
    path = ""
    for scope in scopes:
        if not scope:
            return name
        # a scope is the full path when the exporter kept it (``layer1.0`` under ``layer1``),
        # else the attribute name under the enclosing module (``conv1``)
        path = scope if not path or scope.startswith(path + ".") else f"{path}.{scope}"
    return path or name


def decision_dict(decision: Any) -> Any:
    """A pass decision as JSON-able fields: a dataclass's fields, with ``layer`` (the module
    path) beside a ``node`` name; anything else as its ``str``."""
    if not dataclasses.is_dataclass(decision) or isinstance(decision, type):
        return str(decision)
    d = dataclasses.asdict(decision)
    node = d.get("node")
    if isinstance(node, str):
        d["layer"] = layer_name(node)
    return d

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
    >>> layer_name("/layer1/layer1.0/downsample/downsample.0/Conv")
    'layer1.0.downsample.0'
    """
    if not name.startswith("/"):
        return name
    path: list[str] = []
    for scope in name.split("/")[1:-1]:
        if not scope:
            return name
        # the exporter names a module by its path from the last atom that is not a number:
        # ``conv1`` (a child of the enclosing module), ``layer1.0`` under ``layer1``,
        # ``downsample.0`` under ``layer1.0.downsample``: the enclosing path ends with all
        # but the last atom of such a name
        atoms = scope.split(".")
        if len(atoms) > 1 and path[len(path) - len(atoms) + 1 :] == atoms[:-1]:
            path.append(atoms[-1])
        else:
            path += atoms
    return ".".join(path) or name


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

"""Attributes of a ``GraphModule`` by their dotted names: read (``fetch_attr``, defined in
:mod:`graphopt.core.printing`, which reads constants too), replace, find a free one; and the
name a report gives a node (:func:`layer_path`)."""

from __future__ import annotations

import torch
from torch import nn

from graphopt.core.printing import fetch_attr
from graphopt.fx.tensors import as_normal, as_parameter

__all__ = ["fetch_attr", "free_name", "layer_path", "set_attr"]


def set_attr(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at ``target`` by ``value``: a parameter stays a parameter (with its
    ``requires_grad``), a buffer or plain attribute gets a normal tensor (see
    :mod:`graphopt.fx.tensors`). Never an in-place write: the old tensor may be an inference
    tensor, or shared."""
    *path, name = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, as_parameter(value, old.requires_grad))
    else:
        setattr(owner, name, as_normal(value))


def free_name(gm: nn.Module, stem: str, *, bare: bool = False, start: int = 0) -> str:
    """The first attribute name of ``gm`` not taken: ``stem`` itself when ``bare``, else (or when
    taken) ``{stem}_{i}`` for ``i = start, start + 1, ...``."""
    if bare and not hasattr(gm, stem):
        return stem
    i = start
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


def layer_path(node: torch.fx.Node) -> str:
    """How reports name ``node``: the PyTorch module path (``features.0.0``, where the node's
    own name is ``features_0_0``) for a module call, as the exported ONNX nodes and the int8
    report name layers (:func:`graphopt.core.names.layer_name`); else the node's name."""
    return str(node.target) if node.op == "call_module" else node.name

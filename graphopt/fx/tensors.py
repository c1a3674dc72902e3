"""Tensors that passes store in a graph: normal tensors, whatever mode the pass runs in.

Under ``torch.inference_mode()`` every tensor a pass computes is an *inference tensor*: autograd
cannot save it for backward and nothing may modify it in place outside inference mode. A folded
weight stored as one would make the rewritten graph fail as soon as it is run with gradients
(fine-tuning, ``tune_mode``) or updated by an optimizer, although the pass itself succeeded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def as_normal(value: torch.Tensor) -> torch.Tensor:
    """``value``, or a copy of it made outside inference mode if it is an inference tensor."""
    if not value.is_inference():
        return value
    with torch.inference_mode(False):
        return value.clone()


def as_parameter(value: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
    """A new parameter holding ``value`` (a normal tensor, see :func:`as_normal`)."""
    with torch.inference_mode(False):
        return nn.Parameter(as_normal(value.detach()), requires_grad=requires_grad)


@contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on and inference mode off, for a user's fine-tuning hook: the pass may itself
    run under ``torch.no_grad()`` or ``torch.inference_mode()``, where the hook's
    ``loss.backward()`` would find no graph."""
    with torch.inference_mode(False), torch.enable_grad():
        yield

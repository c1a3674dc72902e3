"""The importance of removing activations: the output error (or a user metric's change) of one
switchable copy of the graph with those activations switched off."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from graphopt.errors import InputError


class _Switch(nn.Module):
    """``on``: the activation's output; off: its input (the activation removed)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = True

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y if self.on else x


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _outputs(v)]
    return []


class Importance:
    """Evaluates sets of removed activations on one switchable copy of the graph.

    ``acts``: the activation nodes of ``gm`` by any key; ``score(removed)`` is the importance
    of removing those keys (0 for none): ``-relative output error`` over ``batches``, or the
    change of ``metric(predict) -> float`` (higher is better; ``predict(*arrays)`` runs the
    graph on numpy inputs and returns numpy outputs -- the same form ``optimize(metric=...)``
    gives int8 quantisation).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        acts: dict[Any, fx.Node],
        batches: list[tuple[Any, ...]],
        metric: Callable[[nn.Module], float] | None = None,
    ) -> None:
        self.batches = batches
        self.metric = metric
        self.evaluated = 0
        names = {node.name: key for key, node in acts.items()}
        self.copy = copy.deepcopy(gm)
        self.switches: dict[Any, _Switch] = {}
        for node in list(self.copy.graph.nodes):
            key = names.get(node.name)
            if key is None:
                continue
            switch = _Switch()
            name = f"_importance_switch_{len(self.switches)}"
            self.copy.add_submodule(name, switch)
            with self.copy.graph.inserting_after(node):
                new = self.copy.graph.call_module(name, (node, node.args[0]))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            self.switches[key] = switch
        self.copy.recompile()
        self.copy.eval()
        self.memo: dict[frozenset, float] = {frozenset(): 0.0}
        with torch.no_grad():
            self.reference = [_outputs(self.copy(*b)) for b in batches]
        self.base = float(metric(self.predict)) if metric is not None else 0.0

    def predict(self, *arrays: Any) -> Any:
        """The switchable graph on numpy (or torch) inputs, numpy outputs: what the user's
        ``metric(predict)`` calls."""
        with torch.no_grad():
            out = self.copy(*(torch.as_tensor(a) for a in arrays))
        outs = [t.numpy() for t in _outputs(out)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def score(self, removed: Iterable[Any]) -> float:
        key = frozenset(removed)
        if key not in self.memo:
            for k, switch in self.switches.items():
                switch.on = k not in key
            with torch.no_grad():
                if self.metric is not None:
                    value = float(self.metric(self.predict)) - self.base
                else:
                    err = ref = 0.0
                    for batch, expected in zip(self.batches, self.reference, strict=True):
                        for y, y0 in zip(_outputs(self.copy(*batch)), expected, strict=True):
                            err += float(((y.double() - y0.double()) ** 2).sum())
                            ref += float((y0.double() ** 2).sum())
                    value = -err / ref if ref > 0 else -err
            for switch in self.switches.values():
                switch.on = True
            if not math.isfinite(value):
                raise InputError(
                    f"the importance of removing {sorted(map(str, key))} is {value}; "
                    "check the calibration data and the metric"
                )
            self.memo[key] = value
            self.evaluated += 1
        return self.memo[key]

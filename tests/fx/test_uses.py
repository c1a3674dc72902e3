"""graphopt.fx.uses: value users vs metadata users, and guards detached from dropped values."""

from __future__ import annotations

import torch
from torch import fx, nn

from graphopt.frontends.torch import capture
from graphopt.fx.effects import remove_dead_nodes
from graphopt.fx.uses import (
    detach_static_reads,
    is_metadata_read,
    metadata_users,
    redirect_metadata_reads,
    value_users,
)


class _Guarded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "rank")
        torch._assert(y.dim() == 4, "rank")
        n, c = y.shape[0], y.size(1)
        return y.relu().reshape(n, c, -1) * y.numel()


def _graph() -> fx.GraphModule:
    return capture(_Guarded().eval(), (torch.randn(2, 3, 5, 5),)).graph


def _node(gm: fx.GraphModule, target) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


def test_metadata_reads_are_not_value_users():
    gm = _graph()
    y = _node(gm, "conv")
    assert [u.target for u in value_users(y)] == ["relu"]
    kinds = sorted(str(u.target) if u.op == "call_method" else u.args[1] for u in metadata_users(y))
    assert kinds == ["dim", "ndim", "numel", "shape", "size"]
    # a read that also takes the value elsewhere is a value use
    g = fx.Graph()
    a = g.placeholder("a")
    same = g.call_method("size", (a, a))
    assert not is_metadata_read(same, a)


def test_redirected_reads_follow_the_replacement():
    gm = _graph()
    y, r = _node(gm, "conv"), _node(gm, "relu")
    redirect_metadata_reads(y, r)
    assert not metadata_users(y) and len(metadata_users(r)) == 5


def test_static_reads_of_a_dropped_value_become_constants():
    gm = _graph()
    x = torch.randn(3, 3, 5, 5)
    expected = gm(x)
    y = _node(gm, "conv")
    # y's values are no longer needed (a pass replaced its one value user by an equal value)
    relu = _node(gm, "relu")
    with gm.graph.inserting_after(y):
        twin = gm.graph.call_module("conv", (y.args[0],))
    twin.meta = dict(y.meta)
    relu.replace_input_with(y, twin)
    redirect_metadata_reads(y, twin)  # the shape reads move; ndim/dim() moved too
    assert not y.users
    remove_dead_nodes(gm)
    assert all(n is not y for n in gm.graph.nodes)  # erased
    gm.recompile()
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_a_guard_alone_no_longer_keeps_a_value_alive():
    gm = _graph()
    y = _node(gm, "conv")
    for u in value_users(y):  # drop the value path: the output reads x's relu instead
        u.replace_input_with(y, y.args[0])
    shape_reads = [
        u for u in metadata_users(y) if u.target in ("size", "numel") or u.args[1:] == ("shape",)
    ]
    for u in shape_reads:
        u.replace_input_with(y, y.args[0])
    assert detach_static_reads(gm) == 2  # ndim and dim(); 4 from the recorded rank
    remove_dead_nodes(gm)
    assert not any(n.target == "conv" for n in gm.graph.nodes)
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert]
    assert len(asserts) == 2 and all(a.args[0].args[0] == 4 for a in asserts)
    gm.recompile()
    gm(torch.randn(1, 3, 5, 5))  # the guards still run, and hold


def test_a_shape_template_is_a_metadata_read():
    """``y.reshape_as(x)`` reads only x's shape (timm's LinearNorm); y's values are read."""
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    for method in ("reshape_as", "view_as", "expand_as"):
        use = g.call_method(method, (y, x))
        assert is_metadata_read(use, x) and not is_metadata_read(use, y)
    assert not is_metadata_read(g.call_method("reshape_as", (x, x)), x)

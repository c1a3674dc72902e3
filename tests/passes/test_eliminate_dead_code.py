"""eliminate-dead-code: structure, numerics, what must be kept, properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import fx, nn

from graphopt.core.printing import fingerprint
from graphopt.fx.effects import remove_dead_nodes
from graphopt.passes.eliminate_dead_code import EliminateDeadCode
from graphopt.testing import assert_pass_preserves, random_cnns, run_pass, verify_rewrite


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class _DeadBranches(nn.Module):
    """A conv whose input also feeds a dead module call, a dead function chain and a dead read
    of a parameter only that chain uses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.randn(3, 1, 1, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        self.unused(x)
        torch.sigmoid(x * self.scale).mean()
        return torch.relu(self.conv(x))


class _Live(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


# ------------------------------------------------------------------------------------------------
# 1. structure


def test_removes_dead_nodes_modules_and_constants():
    result = verify_rewrite("eliminate-dead-code", _DeadBranches(), _Live(), (_x(2, 3, 6, 6),))
    assert dict(result.stats) == {"removed-nodes": 5, "removed-modules": 1, "removed-constants": 1}
    assert not hasattr(result.graph, "unused") and not hasattr(result.graph, "scale")


def test_keeps_unused_modules_when_asked():
    gm, result = run_pass(
        "eliminate-dead-code", _DeadBranches(), (_x(2, 3, 6, 6),), remove_unused_modules=False
    )
    assert result.stats["removed-nodes"] == 5 and "removed-modules" not in result.stats
    assert isinstance(gm.get_submodule("unused"), nn.Conv2d)


# ------------------------------------------------------------------------------------------------
# 2. numerics


def test_dead_code_removal_keeps_numerics_for_any_batch():
    result = assert_pass_preserves(
        EliminateDeadCode,
        _DeadBranches(),
        (_x(2, 3, 6, 6),),
        more_inputs=[(_x(5, 3, 6, 6, seed=2),)],
        expect_modified=True,
    )
    assert result.stats["removed-nodes"] == 5


def test_dead_code_behind_extra_outputs_is_kept():
    class M(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            torch.tanh(y)  # dead
            return y, y * 2  # both live

    result = assert_pass_preserves(EliminateDeadCode, M(), (_x(3, 4),), expect_modified=True)
    assert dict(result.stats) == {"removed-nodes": 1}


# ------------------------------------------------------------------------------------------------
# 3. must not fire: nodes without users that still matter


def test_live_graph_is_left_alone():
    result = assert_pass_preserves(
        EliminateDeadCode, _Live(), (_x(2, 3, 6, 6),), expect_modified=False
    )
    assert dict(result.stats) == {}


def test_unused_input_is_kept():
    class M(nn.Module):
        def forward(self, x, unused):
            return x * 2

    gm, result = run_pass("eliminate-dead-code", M(), (_x(2, 3), _x(2, 3, seed=2)))
    assert not result.modified
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 2


class _InPlace(nn.Module):
    """y = 2x, then an in-place op on y whose own result nobody reads."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = x * 2
        if self.how == "method":
            y.add_(1)
        elif self.how == "torch.relu_":
            torch.relu_(y)
        elif self.how == "F.relu(inplace=True)":
            F.relu(y, inplace=True)
        elif self.how == "F.relu(y, True)":
            F.relu(y, True)
        elif self.how == "F.hardtanh(inplace)":
            F.hardtanh(y, -0.5, 0.5, True)
        elif self.how == "nn.ReLU(inplace=True)":
            self.relu(y)
        return y


@pytest.mark.parametrize(
    "how",
    [
        "method",
        "torch.relu_",
        "F.relu(inplace=True)",
        "F.relu(y, True)",
        "F.hardtanh(inplace)",
        "nn.ReLU(inplace=True)",
    ],
)
def test_in_place_op_with_unused_result_is_kept(how):
    result = assert_pass_preserves(
        EliminateDeadCode, _InPlace(how), (_x(3, 4),), expect_modified=False
    )
    assert dict(result.stats) == {}


def test_in_place_flag_passed_positionally_is_seen():
    """Tracing turns F.relu(y, True) into kwargs; a graph built by hand or by another frontend
    may keep it positional."""
    graph = fx.Graph()
    y = graph.call_function(torch.mul, (graph.placeholder("x"), 2))
    graph.call_function(F.relu, (y, True))
    graph.output(y)
    gm = fx.GraphModule(nn.Module(), graph)
    result = assert_pass_preserves(EliminateDeadCode, gm, (_x(3, 4),), expect_modified=False)
    assert dict(result.stats) == {}


def test_random_op_with_unused_result_is_kept():
    """Drawing random numbers advances the generator: dropping the draw changes later draws."""

    class M(nn.Module):
        def forward(self, x):
            torch.randn_like(x)
            return x + 1

    gm, result = run_pass("eliminate-dead-code", M(), (_x(3, 4),))
    assert not result.modified
    assert any(n.target is torch.randn_like for n in gm.graph.nodes)


# ------------------------------------------------------------------------------------------------
# 4. properties on random CNNs, each with a dead branch added


class _WithDeadBranch(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.dead = nn.Identity()

    def forward(self, x):
        self.dead(torch.relu(x) * 2)
        return self.inner(x)


@given(random_cnns())
def test_random_cnns_keep_numerics_report_honestly_and_are_idempotent(case):
    model = _WithDeadBranch(case.model)
    result = assert_pass_preserves(
        EliminateDeadCode,
        model,
        case.inputs,
        expect_modified=True,
        more_inputs=[case.other_batch()],
    )
    assert result.stats["removed-nodes"] >= 3 and result.stats["removed-modules"] >= 1
    printed = fingerprint(result.graph)
    again, second = run_pass(EliminateDeadCode(), copy.deepcopy(result.graph), case.inputs)
    assert not second.modified, dict(second.stats)
    assert fingerprint(again) == printed
    assert all(n.users or n.op in ("placeholder", "output") for n in again.graph.nodes)
    assert isinstance(again, fx.GraphModule)


# ------------------------------------------------------------------------------------------------
# issue 15: inference mode; one rule for every pass


def test_under_inference_mode(under_inference_mode):
    result = under_inference_mode(EliminateDeadCode(), _DeadBranches(), (_x(2, 3, 6, 6),))
    assert result.stats["removed-nodes"] == 5
    result = under_inference_mode(EliminateDeadCode(), _InPlace("method"), (_x(3, 4),))
    assert "removed-nodes" not in result.stats  # the unused y.add_(1) stays


def test_no_pass_cleans_up_with_fx_dead_code_elimination_alone():
    """#15.3: FX's ``graph.eliminate_dead_code()`` deletes in-place ops whose result is unused;
    every pass cleans up through ``remove_dead_nodes`` (one rule, ``is_impure``)."""
    import pathlib

    import graphopt.fx
    import graphopt.passes

    roots = [pathlib.Path(m.__file__).parent for m in (graphopt.passes, graphopt.fx)]
    home = roots[1] / "effects.py"  # the rule's own home
    bare = [
        f"{path.name}:{i}"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if path != home
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if ".eliminate_dead_code(" in line and "is_impure_node" not in line
    ]
    assert not bare, f"FX dead-code elimination without the in-place rule at {bare}"


def test_remove_dead_nodes_keeps_in_place_ops():
    gm = torch.fx.symbolic_trace(_InPlace("torch.relu_"))
    gm.graph.call_function(torch.sigmoid, (next(iter(gm.graph.nodes)),))  # dead, pure
    assert remove_dead_nodes(gm) == 1
    assert any(n.target is torch.relu_ for n in gm.graph.nodes)

"""The pass manager's backup copy (graphopt.core.copying.deep_copy) is what copy.deepcopy makes:
the same code, values, flags, hooks and ties, and nothing shared with the original."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from graphopt.core.copying import deep_copy
from graphopt.core.ir import FX
from graphopt.frontends.torch import capture
from graphopt.testing import fuzz_case
from graphopt.zoo import get as zoo_model


def _same_as_deepcopy(original: nn.Module) -> nn.Module:
    ours, theirs = deep_copy(original), copy.deepcopy(original)
    if isinstance(original, fx.GraphModule):
        assert ours.code == theirs.code
    assert [(n, type(m).__name__, m.training) for n, m in ours.named_modules()] == [
        (n, type(m).__name__, m.training) for n, m in theirs.named_modules()
    ]
    mine, kept = ours.state_dict(keep_vars=True), original.state_dict(keep_vars=True)
    assert mine.keys() == kept.keys()
    for name, t in mine.items():
        assert type(t) is type(kept[name]) and t.requires_grad == kept[name].requires_grad
        assert torch.equal(t, kept[name]), name
        assert t.data_ptr() != kept[name].data_ptr() or t.numel() == 0, f"{name} is shared"
    return ours


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_graphs_copy_as_deepcopy_does_and_run_alike(seed):
    fc = fuzz_case(seed, "cnn")
    gm = capture(fc.source, fc.inputs).graph
    ours = _same_as_deepcopy(gm)
    with torch.no_grad():
        torch.testing.assert_close(ours(*fc.inputs), gm(*fc.inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mobileone_s0", "fastvit_t"])
def test_zoo_graphs_copy_as_deepcopy_does(name):
    zoo = zoo_model(name)
    model, inputs = zoo.model, zoo.example_inputs
    gm = capture(model, inputs).graph
    ours = _same_as_deepcopy(gm)
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs), gm(*inputs), rtol=0, atol=0)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.scale = torch.full((4,), 2.0)  # a plain tensor attribute, not a buffer
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.names = ["a", "b"]
        self.a.register_forward_hook(lambda m, i, o: o * self.scale)

    def forward(self, x):
        return self.b(self.a(x))


def test_ties_hooks_and_plain_attributes_are_copied_not_shared():
    model = _Tied().train(False)
    ours = _same_as_deepcopy(model)
    assert ours.b.weight is ours.a.weight and ours.a.weight is not model.a.weight
    assert ours.scale is not model.scale and torch.equal(ours.scale, model.scale)
    assert ours.names == model.names and ours.names is not model.names
    assert len(ours.a._forward_hooks) == 1
    x = torch.randn(3, 4)
    torch.testing.assert_close(ours(x), model(x), rtol=0, atol=0)
    with torch.no_grad():  # what a pass may do to its graph: nothing reaches the backup
        ours.a.weight.mul_(3)
        ours.scale.add_(1)
        ours.steps.add_(1)
    ours.names.append("c")
    assert not torch.equal(ours(x), model(x))
    assert model.steps.item() == 0 and model.names == ["a", "b"]
    assert torch.equal(model.scale, torch.full((4,), 2.0))


class _CustomCopy(nn.Module):
    """A class with its own __deepcopy__: deep_copy must defer to it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.copies = 0

    def __deepcopy__(self, memo):
        new = _CustomCopy()
        new.lin.load_state_dict(self.lin.state_dict())
        new.copies = self.copies + 1
        return new

    def forward(self, x):
        return self.lin(x)


def test_a_module_with_its_own_deepcopy_is_copied_by_it():
    outer = nn.Sequential(_CustomCopy(), nn.ReLU())
    ours = deep_copy(outer)
    assert ours[0].copies == 1 and ours[0] is not outer[0]


def test_nested_graph_modules_and_the_backup_of_an_inference_mode_graph():
    """The backup FX.copy makes under torch.inference_mode() holds normal tensors (it stays
    trainable, like the graph), and a GraphModule inside another is copied whole."""

    class _KeepGraphModules(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, fx.GraphModule) or super().is_leaf_module(m, name)

    inner = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    root = nn.Sequential(inner, nn.Flatten())
    outer = fx.GraphModule(root, _KeepGraphModules().trace(root))
    assert isinstance(outer.get_submodule("0"), fx.GraphModule)
    with torch.inference_mode():
        backup = FX.copy(outer)
        x = torch.randn(1, 3, 6, 6)
        expected = outer(x)
    assert not any(p.is_inference() for p in backup.parameters())
    assert isinstance(backup.get_submodule("0"), fx.GraphModule)
    assert backup.get_submodule("0") is not outer.get_submodule("0")
    with torch.no_grad():
        torch.testing.assert_close(backup(x.clone()), expected.clone(), rtol=0, atol=0)

"""Capture: symbolic tracing, the torch.export fallback, and errors that say how to fix them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt.core.numerics import run_module
from graphopt.errors import CaptureError, InputError
from graphopt.frontends.torch import capture


class ShapeBranch(nn.Module):
    """Control flow on a shape: symbolic tracing fails, torch.export specialises."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.shape[-1] > 4:
            y = y * 2
        return y


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither tracer can capture it
            return x * 2
        return x - 1


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_symbolic_trace_records_shapes_on_every_node():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    cap = capture(m, (torch.randn(2, 3, 8, 8),))
    assert cap.method == "symbolic_trace"
    for node in cap.graph.graph.nodes:
        if node.op != "output":
            assert tuple(node.meta["tensor_meta"].shape)[0] == 2
    assert cap.inputs[0].shape == ("batch", 3, 8, 8)
    assert cap.inputs[0].dtype == torch.float32


def test_model_is_never_mutated():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cap = capture(m, (torch.randn(2, 3, 8, 8),))
    for p in cap.graph.parameters():
        p.data.add_(1.0)
    assert m.training  # captured in eval mode, on a copy
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert any("training mode" in n for n in cap.notes)


def test_shape_control_flow_falls_back_to_torch_export_and_says_so():
    m = ShapeBranch().eval()
    x = torch.randn(1, 3, 8, 8)
    cap = capture(m, (x,))
    assert cap.method == "torch.export"
    assert any("symbolic tracing failed" in n and "torch.export" in n for n in cap.notes)
    assert torch.allclose(run_module(cap.graph, (x,))[0], m(x))


def test_data_dependent_control_flow_gives_capture_error_with_line_and_fix():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent().eval(), (torch.randn(1, 3, 4, 4),))
    text = str(info.value)
    assert "test_capture.py" in text and "if x.sum() > 0:" in text
    assert "(Gate)" in text
    assert "leaf_modules=[Gate]" in text and "concrete_args" in text
    assert "torch.export fallback also failed" in text


def test_leaf_modules_fix_works():
    m = DataDependent().eval()
    x = torch.randn(1, 3, 4, 4)
    cap = capture(m, (x,), leaf_modules=[Gate])
    assert cap.method == "symbolic_trace"
    assert torch.equal(run_module(cap.graph, (x,))[0], m(x))


def test_without_example_inputs_the_error_says_to_pass_them():
    with pytest.raises(CaptureError, match="no example_inputs were given"):
        capture(ShapeBranch().eval())


def test_wrong_example_inputs_are_an_input_error():
    with pytest.raises(InputError, match=r"raised on the example inputs \(\(1, 5, 8, 8\)"):
        capture(ShapeBranch().eval(), (torch.randn(1, 5, 8, 8),))
    with pytest.raises(InputError, match="tuple of tensors"):
        capture(ShapeBranch().eval(), "not a tensor")


def test_not_a_model():
    with pytest.raises(CaptureError, match="torch.nn.Module, an .onnx path"):
        capture(42, ())


def test_tensors_frozen_by_tracing_are_noted():
    class Noise(nn.Module):
        def forward(self, x):
            return x + torch.randn(4)

    cap = capture(Noise(), (torch.randn(2, 4),))
    assert any("frozen into constants" in n and "_tensor_constant0" in n for n in cap.notes)
    plain = capture(nn.Linear(4, 2), (torch.randn(2, 4),))
    assert not any("frozen" in n for n in plain.notes)


def test_graphopt_capture_is_callable_after_its_module_was_imported():
    """Importing the capture module (``graphopt.frontends.torch``) leaves ``graphopt.capture``
    the function (it used to raise "'module' object is not callable" when the module was
    ``graphopt.capture``)."""
    import graphopt
    import graphopt.frontends.torch  # noqa: F401 - the import is the point

    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    captured = graphopt.capture(model, (torch.randn(1, 3),))
    x = torch.randn(4, 3)
    assert torch.equal(captured.graph(x), model(x))


class _ItemAssign(nn.Module):
    """Item assignment fails symbolic tracing: captured by torch.export."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.fixed = fixed

    def forward(self, x):
        v = self.conv(x)
        v[:, 0] = 0
        return v.reshape(2, -1) if self.fixed else v


def test_torch_export_fallback_declares_the_batch_it_was_exported_with():
    m = _ItemAssign().eval()
    cap = capture(m, (torch.randn(1, 3, 8, 8),))
    assert cap.method == "torch.export" and cap.inputs[0].shape == (1, 3, 8, 8)
    assert any("could not keep the batch dynamic" in n for n in cap.notes)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(cap.graph(x), m(x))


def test_optimized_torch_export_model_refuses_other_batches_instead_of_computing_them_wrong():
    import graphopt
    from graphopt.errors import InputError

    m = ShapeBranch().eval()  # control flow on a shape: captured by torch.export
    result = graphopt.optimize(m, "cpu", (torch.randn(2, 3, 8, 8),), measure=False)
    assert result.report.capture_method == "torch.export"
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(result(x), m(x), atol=1e-5)
    with pytest.raises(InputError, match="should be"):
        result(torch.randn(3, 3, 8, 8))


class _Attention(nn.Module):
    """timm's attention signature: optional non-tensor arguments with defaults."""

    def forward(self, x, attn_mask=None, is_causal=False, scale=2.0):
        if attn_mask is not None:
            x = x + attn_mask
        if is_causal:
            x = x.tril()
        return x * scale


def test_arguments_with_defaults_not_given_are_bound_not_inputs():
    m = _Attention().eval()
    x = torch.randn(2, 3, 3)
    cap = capture(m, (x,))
    assert [n.target for n in cap.graph.graph.nodes if n.op == "placeholder"] == ["x"]
    assert [s.name for s in cap.inputs] == ["x"]
    assert torch.equal(run_module(cap.graph, (x,))[0], m(x))


def test_a_default_argument_given_as_an_example_input_stays_an_input():
    m = _Attention().eval()
    x, mask = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    cap = capture(m, (x, mask), concrete_args={"is_causal": True})
    assert [s.name for s in cap.inputs] == ["x", "attn_mask"]
    assert torch.equal(run_module(cap.graph, (x, mask))[0], m(x, mask, is_causal=True))

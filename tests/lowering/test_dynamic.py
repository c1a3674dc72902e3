"""Dynamic axes, names and metadata through ``optimize()``: what a user's interface keeps.

An ``nn.Module`` with ``dynamic_axes``, and an ONNX file with symbolic dims (its own names, a
batch at axis 1, named outputs): the artifact declares the same interface, runs in plain ONNX
Runtime at other sizes with the model's numbers, names its nodes by module path and says what
made it. A model whose export freezes a size is caught at the second size, not shipped.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends import exported
from graphopt.core.dynamic_axes import other_sizes, resolve
from graphopt.core.numerics import Numerics, compare
from graphopt.errors import ArgumentError, InputError, VerificationError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv1(x)))
        return self.fc(y.mean((2, 3)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x)


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    bn = net.layer1[0].bn
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return net


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _ort(proto: onnx.ModelProto, *arrays: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), arrays, strict=True)})


def test_a_modules_dynamic_axes_names_and_metadata_survive() -> None:
    net = _net()
    axes = {"x": {0: "batch", 2: "height", 3: "width"}}
    result = graphopt.optimize(
        net, example_inputs=(torch.randn(1, 3, 16, 16),), dynamic_axes=axes, measure=False
    )
    proto = result.artifact.proto
    assert _dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    assert _dims(proto.graph.output[0]) == ["batch", 5]
    assert result.inputs[0].shape == ("batch", 3, "height", "width")
    # the nodes carry the module path, as torch.onnx.export of the module names them
    names = [n.name for n in proto.graph.node]
    assert "/layer1/layer1.0/conv1/Conv" in names
    assert "/layer1/layer1.0/fc/Gemm" in names
    assert "/layer1/layer1.0/Relu" in names
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["graphopt_version"] == graphopt.__version__
    assert props["graphopt_pipeline"] == result.report.pipeline
    assert props["graphopt_error"].endswith(": ok")
    assert {v.name for v in proto.graph.value_info}  # shapes for Netron
    for shape in [(3, 3, 20, 12), (1, 3, 7, 33)]:  # any size along every dynamic axis
        x = torch.randn(shape)
        (got,) = _ort(proto, x.numpy())
        with torch.no_grad():
            want = net(x)
        assert compare([want], [torch.from_numpy(got)], Numerics.exact()).ok
        assert torch.equal(result(x), torch.from_numpy(got))


def test_the_default_keeps_the_batch_only() -> None:
    result = graphopt.optimize(_net(), example_inputs=(torch.randn(2, 3, 8, 8),), measure=False)
    assert _dims(result.artifact.proto.graph.input[0]) == ["batch", 3, 8, 8]
    with pytest.raises(InputError, match="any size"):
        result(torch.randn(1, 3, 9, 8))


def _onnx_file() -> bytes:
    """A model whose batch is axis 1 of its state, with named inputs, outputs and dims."""

    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor, state: torch.Tensor):
            h = self.proj(x).mean(1) + state.sum(0)  # x: [N, T, 6]; state: [2, N, 4]
            return torch.tanh(h), state * 0.5

    torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.onnx.export(
        Stateful().eval(),
        (torch.randn(1, 5, 6), torch.randn(2, 1, 4)),
        buffer,
        dynamo=False,
        input_names=["audio", "state"],
        output_names=["logits", "new_state"],
        dynamic_axes={
            "audio": {0: "N", 1: "frames"},
            "state": {1: "N"},
            "logits": {0: "N"},
            "new_state": {1: "N"},
        },
    )
    return buffer.getvalue()


def test_an_onnx_files_interface_is_kept_batch_at_axis_1_included() -> None:
    data = _onnx_file()
    x, s = torch.randn(1, 5, 6), torch.randn(2, 1, 4)
    result = graphopt.optimize(data, example_inputs=(x, s), measure=False)
    proto = result.artifact.proto
    assert [i.name for i in proto.graph.input] == ["audio", "state"]
    assert [o.name for o in proto.graph.output] == ["logits", "new_state"]
    assert _dims(proto.graph.input[0]) == ["N", "frames", 6]
    assert _dims(proto.graph.input[1]) == [2, "N", 4]
    assert _dims(proto.graph.output[0]) == ["N", 4]
    assert _dims(proto.graph.output[1]) == [2, "N", 4]
    original = onnx.load_from_string(data)
    for n, t in [(3, 9), (2, 1)]:
        feeds = (np.random.default_rng(n).standard_normal((n, t, 6)).astype(np.float32),)
        feeds += (np.random.default_rng(t).standard_normal((2, n, 4)).astype(np.float32),)
        want = [torch.from_numpy(a) for a in _ort(original, *feeds)]
        got = [torch.from_numpy(a) for a in _ort(proto, *feeds)]
        assert compare(want, got, Numerics.exact()).ok


def test_a_symbolic_dim_without_example_is_refused_with_what_to_pass() -> None:
    with pytest.raises(InputError, match=r"'audio' has symbolic dimensions axis 1 \('frames'\)"):
        graphopt.optimize(_onnx_file(), measure=False)


class _Fold(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[3]) * 2


def test_an_export_that_freezes_a_dynamic_axis_is_caught_at_the_second_size(monkeypatch) -> None:
    """An exporter that freezes the sizes (as tracing did with ``torch.tensor(x.shape)``)
    while the file still declares the axis symbolic: the artifact runs at the example's size
    and fails at another, so optimize() refuses it, naming the export."""
    real = exported.export_onnx

    def freezing(module, inputs, *, dynamic_axes=None, **kw):
        proto = real(module, inputs, **{**kw, "dynamic_axes": {}, "output_axes": None})
        for vi in proto.graph.input:  # declared dynamic, computed static
            vi.type.tensor_type.shape.dim[3].dim_param = "width"
        return proto

    monkeypatch.setattr(exported, "export_onnx", freezing)
    with pytest.raises(VerificationError, match="'width' at twice the example's size") as info:
        graphopt.optimize(
            _Fold(),
            example_inputs=(torch.randn(1, 2, 3, 4),),
            dynamic_axes={"x": {3: "width"}},
            measure=False,
        )
    assert info.value.stage == "export"


def test_dynamic_axes_are_checked_and_varied_one_dim_at_a_time() -> None:
    x, mask = torch.randn(2, 3, 8), torch.ones(2, 8, dtype=torch.int64)
    axes = resolve({"x": {0: "batch", 2: "seq"}, 1: {0: "batch", -1: "seq"}}, ["x", "m"], [x, mask])
    assert axes == {"x": {0: "batch", 2: "seq"}, "m": {0: "batch", 1: "seq"}}
    varied = other_sizes(axes, ["x", "m"], [x, mask])
    assert [v.shape for v in varied["batch"]] == [(4, 3, 8), (4, 8)]
    assert [v.shape for v in varied["seq"]] == [(2, 3, 16), (2, 16)]
    assert torch.equal(varied["batch"][0][2:], x.flip(0))  # the items in another order
    assert resolve({"x": [1]}, ["x"], [x]) == {"x": {1: "x_dim1"}}
    with pytest.raises(ArgumentError, match="not an input of the model"):
        resolve({"y": [0]}, ["x"], [x])
    with pytest.raises(ArgumentError, match="not an axis of input 'x'"):
        resolve({"x": [3]}, ["x"], [x])
    with pytest.raises(ArgumentError, match="axes that share a name share a size"):
        other_sizes({"x": {0: "n", 1: "n"}}, ["x"], [x])


class _TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(4, 4, 3, padding=1)
        self.k1 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.k3(x) + self.k1(x))


def test_a_module_a_pass_creates_keeps_the_path_of_what_it_replaced() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(_TwoBranch())).eval()
    result = graphopt.optimize(net, example_inputs=(torch.randn(1, 3, 8, 8),), measure=False)
    assert "reparameterize" in result.report.pipeline
    names = [n.name for n in result.artifact.proto.graph.node]
    merged = [n for n in names if "reparam" in n]
    assert merged and all(n.startswith("/1/1.0/reparam") for n in merged), names


def test_a_size_the_file_refuses_is_a_warning_and_onnx_runtime_says_it_in_the_notes(capfd):
    """A file whose symbolic dim only runs at one size (a Reshape to a constant shape): the
    second-size check is skipped with a warning, and ONNX Runtime's error line for that run
    goes into the report's notes, not onto the user's terminal."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "h"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 8])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y])
    graph.initializer.append(shape)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    example = torch.randn(1, 2, 4)
    capfd.readouterr()
    result = graphopt.optimize(model, "cpu", [example], measure=False)
    err = capfd.readouterr().err
    assert "Non-zero status code" not in err and "[E:onnxruntime" not in err, err
    report = result.report
    assert any("does not run with these dynamic axes" in w and "h" in w for w in report.warnings)
    assert any("onnxruntime" in n.lower() for n in report.notes), report.notes
    np.testing.assert_allclose(result(example).numpy(), example.reshape(1, 8).numpy())

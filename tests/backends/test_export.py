"""The torch -> ONNX export: a dynamic batch, the model's interface kept (names, unused inputs,
0-d tensors), runtime shapes of imported ONNX models, the torch.export fallback, attention,
exports in threads, and the arrays the runtimes take."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphopt.backends import export
from graphopt.backends.export import export_onnx
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.shape_ops import exported_as, exports_as, with_shape_ops
from graphopt.errors import BackendError, InputError
from graphopt.frontends.onnx import runtime
from graphopt.frontends.torch import capture
from graphopt.testing import small_conv_net


def _model():
    return small_conv_net(0)


def test_export_keeps_batch_dynamic_and_ir_version_loadable():
    m, x = _model()
    gm = capture(m, (x,)).graph
    proto = export_onnx(gm, (x,), input_names=["image"])
    assert proto.ir_version <= 10
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert proto.graph.input[0].name == "image"
    artifact = OnnxRuntimeBackend("cpu").load(proto)
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 16, 16)
        (got,) = artifact.run([xb.numpy()])
        with torch.no_grad():
            want = m(xb).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


# ---- issue 15: the model's interface survives export (item 10)


class _TwoInTwoOut(torch.nn.Module):
    """Reads only its first input; returns two tensors."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, unused):
        y = self.linear(x)
        return y, y.relu()


def test_export_keeps_unused_inputs_by_name_count_and_order_and_takes_output_names():
    m = _TwoInTwoOut().eval()
    x, unused = torch.randn(2, 4), torch.randn(2, 7)
    proto = export_onnx(
        m, (x, unused), input_names=["x", "mask.1"], output_names=["logits:0", "act"]
    )
    # ONNX names as they are, not "mask_1": a caller feeding by name finds them
    assert [i.name for i in proto.graph.input] == ["x", "mask.1"]
    assert [o.name for o in proto.graph.output] == ["logits:0", "act"]
    mask_dims = proto.graph.input[1].type.tensor_type.shape.dim
    assert mask_dims[0].dim_param and mask_dims[1].dim_value == 7
    artifact = OnnxRuntimeBackend("cpu").load(proto)
    got = artifact.run([x.numpy(), unused.numpy()])  # was: ValueError: zip() ...
    with torch.no_grad():
        want = m(x, unused)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(BackendError, match="output name"):
        export_onnx(m, (x, unused), output_names=["only_one"])
    with pytest.raises(BackendError, match="repeat a name"):
        export_onnx(m, (x, unused), output_names=["y", "y"])
    with pytest.raises(InputError, match="takes 2 input"):
        artifact.run([x.numpy()])


def _shape_model(op: str) -> onnx.ModelProto:
    """An ONNX model whose integer input ``shape`` drives ``op`` at run time, plus an unused
    input."""
    from onnx import TensorProto, helper

    def const(name, values):
        return helper.make_node(
            "Constant",
            [],
            [name],
            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values),
        )

    x_shape = [3, 1] if op == "Expand" else [2, 3, 4]
    shape_len = {"Expand": 3, "Slice": 1, "Range": 1}.get(op, 2)
    nodes = {
        "Reshape": [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "Expand": [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "ConstantOfShape": [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["y"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.5]),
            )
        ],
        "Range": [],
        "Slice": [
            const("starts", [-1]),
            const("axes", [2]),
            const("steps", [-1]),
            helper.make_node("Slice", ["x", "starts", "shape", "axes", "steps"], ["y"]),
        ],
    }[op]
    if op == "Range":  # 0 .. shape[0], cast to float
        nodes = [
            const("zero", [0]),
            const("one", [1]),
            helper.make_node("Squeeze", ["zero"], ["start"]),
            helper.make_node("Squeeze", ["one"], ["delta"]),
            helper.make_node("Squeeze", ["shape"], ["limit"]),
            helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT16),
        ]
    rank = {"Reshape": 2, "Expand": 3, "ConstantOfShape": 2, "Slice": 3, "Range": 1}[op]
    out_type = TensorProto.FLOAT16 if op == "Range" else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        op,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [shape_len]),
            helper.make_tensor_value_info("unused", TensorProto.FLOAT, [2, 5]),
        ],
        [helper.make_tensor_value_info("y", out_type, [f"d{i}" for i in range(rank)])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "op, example, other",
    [
        ("Reshape", [6, 4], [4, 6]),
        ("Expand", [2, 3, 1], [1, 3, 5]),
        ("ConstantOfShape", [2, 2], [3, 1]),
        ("Slice", [0], [-6]),
        ("Range", [3], [5]),
    ],
)
def test_runtime_shape_inputs_stay_inputs_when_an_imported_onnx_model_is_exported(
    op, example, other
):
    from graphopt.frontends.onnx import import_onnx

    gm = import_onnx(_shape_model(op))
    x = torch.randn(3, 1) if op == "Expand" else torch.randn(2, 3, 4)
    unused = torch.randn(2, 5)
    proto = export_onnx(
        gm, (x, torch.tensor(example), unused), input_names=["x", "shape", "unused"]
    )
    assert [i.name for i in proto.graph.input] == ["x", "shape", "unused"]
    artifact = OnnxRuntimeBackend("cpu").load(proto)
    for shape in (example, other):  # another shape value: not frozen to the example's
        (got,) = artifact.run([x.numpy(), np.array(shape, np.int64), unused.numpy()])
        with torch.no_grad():
            want = gm(x, torch.tensor(shape), unused)
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


class _ScalarInputs(torch.nn.Module):
    """0-d inputs and a 0-d output; the last axis moved with a negative index."""

    def forward(self, x, lo, hi):
        y = torch.clamp(x, lo, hi).movedim(1, -1)
        return y, (lo + hi) * 2


def test_zero_dim_inputs_and_outputs_and_negative_movedim_export_and_run():
    m = _ScalarInputs()
    x, lo, hi = torch.randn(2, 3, 4), torch.tensor(-0.5), torch.tensor(0.5)
    artifact = OnnxRuntimeBackend("cpu").compile(m, (x, lo, hi))
    assert artifact.static_shape_reason is None
    y, s = artifact.run([x.numpy(), lo.numpy(), hi.numpy()])  # was: rank 0 fed as rank 1
    want_y, want_s = m(x, lo, hi)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-6)
    assert s.shape == () and float(s) == float(want_s)


# ---- issue 15: the torch.export fallback lowers; attention exports (item 12)


class _ShapeBranch(torch.nn.Module):
    """Control flow on a shape: symbolic tracing fails, torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.bn(self.linear(x))
        return -x


def test_a_torch_export_module_exports_and_still_refuses_train():
    m = _ShapeBranch().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
    x = torch.randn(3, 4)
    gm = torch.export.export(m, (x,), strict=False).module()
    artifact = OnnxRuntimeBackend("cpu").compile(gm, (x,))  # was: Calling train() ...
    (got,) = artifact.run([x.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):  # torch.export's own guard is back in place
        gm.train()


def test_the_dynamo_exporter_is_installed():
    import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter imports it

    m = _TwoInTwoOut().eval()
    x = torch.randn(2, 4)
    proto = export._export_dynamo(
        m,
        (x, x),
        ["x", "unused"],
        ["a", "b"],
        {"x": {0: "batch"}, "unused": {0: "batch"}},
        export.OPSET,
        RuntimeError("-"),
    )
    assert [o.name for o in proto.graph.output] == ["a", "b"]


class _Attention(torch.nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (as timm's ViT)."""

    def __init__(self, gqa: bool):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.gqa = gqa

    def forward(self, x):
        qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.gqa:  # grouped-query: one key/value head for two query heads
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k[:, :1], v[:, :1], enable_gqa=True
            )
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_scaled_dot_product_attention_exports_with_a_dynamic_batch(gqa, traced):
    m = _Attention(gqa).eval()
    module = torch.fx.symbolic_trace(m) if traced else m
    artifact = OnnxRuntimeBackend("cpu").compile(module, (torch.randn(2, 5, 8),))
    assert artifact.static_shape_reason is None
    for batch in (1, 3):
        x = torch.randn(batch, 5, 8)
        (got,) = artifact.run([x.numpy()])
        with torch.no_grad():
            np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-5, atol=1e-5)


# ---- issue 15: exports in threads (item 13)


def test_exports_in_threads_all_succeed():
    from concurrent.futures import ThreadPoolExecutor

    def job(seed):
        m, x = small_conv_net(seed)
        (got,) = OnnxRuntimeBackend("cpu", threads=1).compile(m, (x,)).run([x.numpy()])
        with torch.no_grad():
            return float(np.abs(got - m(x).numpy()).max())

    with ThreadPoolExecutor(6) as pool:
        errors = list(pool.map(job, range(6)))  # was: 4 of 6 failed inside the exporter
    assert all(e < 1e-4 for e in errors), errors


def reshape_dynamic(x, shape):
    """A user's function with the name of the ONNX importer's helper: not the importer's."""
    return x.reshape([int(d) for d in shape.tolist()])


def test_only_graphopts_runtime_shape_helpers_are_exported_as_onnx_ops():
    graph = torch.fx.Graph()
    x, shape = graph.placeholder("x"), graph.placeholder("shape")
    graph.output(graph.call_function(reshape_dynamic, (x, shape)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert with_shape_ops(gm) is gm  # left alone: traced with the example's shape


def test_the_importers_runtime_shape_helpers_are_registered_as_their_onnx_ops():
    assert exported_as(runtime.reshape_dynamic) == "Reshape"
    assert exported_as(runtime.expand_dynamic) == "Expand"
    assert exported_as(runtime.full_dynamic) == "ConstantOfShape"
    assert exported_as(runtime.slice_onnx) == "Slice"
    assert exported_as(runtime.range_dynamic) == "Range"
    assert exported_as(runtime.tile_dynamic) is None  # no twin: traced as torch ops
    assert exported_as(reshape_dynamic) is None  # by identity, not by name
    assert exported_as(torch.reshape) is None


def test_copied_imported_graphs_and_pickled_targets_still_export_their_runtime_shapes():
    from graphopt.frontends.onnx import import_onnx

    gm = import_onnx(_shape_model("Reshape"))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # a pickled target is the module-level function itself, so the registry still knows it
    assert pickle.loads(pickle.dumps(targets)) == targets
    assert [exported_as(t) for t in pickle.loads(pickle.dumps(targets))].count("Reshape") == 1
    x, shape, unused = torch.randn(2, 3, 4), torch.tensor([4, 6]), torch.randn(2, 5)
    for graph in (gm, copy.deepcopy(gm)):
        assert runtime.reshape_dynamic in [n.target for n in graph.graph.nodes]
        swapped = with_shape_ops(graph)
        assert swapped is not graph
        assert runtime.reshape_dynamic not in [n.target for n in swapped.graph.nodes]
        proto = export_onnx(graph, (x, shape, unused))
        cast, reshape = proto.graph.node  # the shape input, cast to int64, is Reshape's shape
        assert cast.op_type == "Cast" and cast.input[0] == proto.graph.input[1].name
        assert reshape.op_type == "Reshape" and reshape.input[1] == cast.output[0]


def test_an_unknown_onnx_op_cannot_be_registered():
    with pytest.raises(ValueError, match="'Reshap'.*Did you mean 'Reshape'"):
        exports_as("Reshap")


def test_all_digit_names_export_without_the_dynamo_fallback(monkeypatch):
    """torch.onnx.export names outputs '4' by default; the TorchScript exporter refuses such
    names, so they are exported under stand-ins and renamed back (not the slow fallback)."""

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back on the dynamo exporter")

    monkeypatch.setattr(export, "_export_dynamo", no_fallback)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4)
    proto = export.export_onnx(m, (x,), input_names=["0"], output_names=["4"])
    assert [i.name for i in proto.graph.input] == ["0"]
    assert [o.name for o in proto.graph.output] == ["4"]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"0": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-6, atol=1e-6)

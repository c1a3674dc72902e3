"""Opaque ONNX nodes: an op without a converter is kept as the ONNX node, run by ONNX Runtime,
and exported back unchanged (graphopt/frontends/onnx/ops/opaque.py, backends/onnx_node.py)."""

from __future__ import annotations

import copy
import io

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.frontends.onnx import import_onnx

FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits],
    )
    ids = [helper.make_opsetid(d, v) for d, v in opsets]
    return helper.make_model(graph, opset_imports=ids, ir_version=10)


def _ort(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _if_model() -> onnx.ModelProto:
    """y = If(sum(x) > 0): then x @ W + b (W, b outer initializers), else -relu(x); then Neg."""
    then = helper.make_graph(
        [
            helper.make_node("MatMul", ["r", "W"], ["t0"]),
            helper.make_node("Add", ["t0", "b"], ["t1"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t1", FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["e1"])],
        "else",
        [],
        [helper.make_tensor_value_info("e1", FLOAT, None)],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["z"], name="branch", then_branch=then, else_branch=other),
        helper.make_node("Neg", ["z"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    inits = [
        ("W", rng.standard_normal((4, 4)).astype(np.float32)),
        ("b", rng.standard_normal(4).astype(np.float32)),
        ("zero", np.zeros((), np.float32)),
    ]
    return _model(nodes, [("x", FLOAT, ["N", 4])], [("y", FLOAT, ["N", 4])], inits)


def test_if_with_a_runtime_condition_is_opaque_and_runs_both_branches() -> None:
    model = _if_model()
    gm = import_onnx(model)
    assert gm.meta["onnx_opaque"] == {
        "branch": "ONNX node 'branch' (If): the condition ('c') is computed at run time, so "
        "neither branch can be inlined."
    }
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and "branch" in n.target)
    # the outer values the branches read are inputs of the call: passes and DCE see them
    assert len(call.args) == 4  # c, then r, W, b
    for sign in (1.0, -1.0):
        x = np.abs(np.random.default_rng(1).standard_normal((3, 4))).astype(np.float32) * sign
        with torch.no_grad():
            got = gm(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(got, _ort(model, [x])[0])


def test_opaque_if_is_exported_unchanged_and_the_artifact_runs_both_branches() -> None:
    model = _if_model()
    x = torch.rand(3, 4)
    result = graphopt.optimize(model, example_inputs=(x,), measure=False)
    proto = result.artifact.proto
    (node,) = [n for n in proto.graph.node if n.op_type == "If"]
    original = next(n for n in model.graph.node if n.op_type == "If")
    # same op, attributes and subgraph ops; the graph names are the exported graph's
    assert [a.name for a in node.attribute] == [a.name for a in original.attribute]
    for got, want in zip(node.attribute, original.attribute, strict=True):
        assert [n.op_type for n in got.g.node] == [n.op_type for n in want.g.node]
    assert all(o.domain != "graphopt.onnx_node" for o in proto.opset_import)
    for sign, rows in ((1.0, 3), (-1.0, 5)):  # both branches, two batch sizes
        feed = np.abs(np.random.default_rng(rows).standard_normal((rows, 4))).astype(np.float32)
        feed *= sign
        np.testing.assert_allclose(
            _ort(proto, [feed])[0], _ort(model, [feed])[0], rtol=1e-5, atol=1e-6
        )


def test_a_com_microsoft_op_keeps_its_domain_through_the_export() -> None:
    nodes = [
        helper.make_node("Exp", ["x"], ["r"]),  # no zero rows: Inverse's input is invertible
        helper.make_node("Inverse", ["r"], ["g"], domain="com.microsoft", name="ms_inverse"),
        helper.make_node("Neg", ["g"], ["y"]),
    ]
    model = _model(
        nodes,
        [("x", FLOAT, ["N", 4, 4])],
        [("y", FLOAT, ["N", 4, 4])],
        opsets=(("", 17), ("com.microsoft", 1)),
    )
    gm = import_onnx(model)
    assert gm.meta["onnx_opaque"] == {"ms_inverse": "no converter for com.microsoft::Inverse"}
    x = torch.randn(2, 4, 4)
    result = graphopt.optimize(model, example_inputs=(x,), measure=False)
    proto = result.artifact.proto
    assert ("com.microsoft", "Inverse") in [(n.domain, n.op_type) for n in proto.graph.node]
    assert {o.domain: o.version for o in proto.opset_import}["com.microsoft"] == 1
    feed = np.random.default_rng(0).standard_normal((5, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_ort(proto, [feed])[0], _ort(model, [feed])[0])


def test_opaque_graph_deep_copies_and_pickles() -> None:
    gm = import_onnx(_if_model())
    x = torch.rand(2, 4)
    with torch.no_grad():
        want = gm(x)
        buffer = io.BytesIO()
        torch.save(gm, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(gm), torch.load(buffer, weights_only=False)):
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)


def test_opaque_node_with_constant_inputs_runs_at_import() -> None:
    nodes = [
        helper.make_node("Einsum", ["a", "a"], ["e"], equation="ij,jk->ik"),
        helper.make_node("Add", ["x", "e"], ["y"]),
    ]
    a = np.arange(9, dtype=np.float32).reshape(3, 3)
    model = _model(nodes, [("x", FLOAT, [3, 3])], [("y", FLOAT, [3, 3])], [("a", a)])
    gm = import_onnx(model)
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # folded to a constant
    x = np.ones((3, 3), np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(gm(torch.from_numpy(x)).numpy(), x + a @ a)


def test_opaque_node_with_a_float8_output_gives_float8_values() -> None:
    """QuantizeLinear to float8 has no converter: ONNX Runtime returns its float8 output as raw
    bytes (uint8); the opaque node gives it back as a float8 tensor, so the Cast graphopt
    converts after it computes what ONNX Runtime computes (not the bytes as numbers)."""
    nodes = [
        helper.make_node(
            "QuantizeLinear", ["x", "scale"], ["q"], output_dtype=TensorProto.FLOAT8E4M3FN
        ),
        helper.make_node("Cast", ["q"], ["y"], to=FLOAT),
    ]
    inits = [("scale", np.array(0.25, np.float32))]
    model = _model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], inits, (("", 21),))
    x = np.array([[0.1, -0.7, 1.3], [2.0, -3.1, 0.0]], np.float32)
    gm = import_onnx(model)
    assert gm.meta["onnx_opaque"], "QuantizeLinear should stay opaque here"
    (expected,) = _ort(model, [x])
    got = gm(torch.from_numpy(x))
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected)

"""ONNX If (graphopt/frontends/onnx/ops/control.py): a condition known at import inlines the taken
branch -- a Constant, an initializer, a Shape-derived comparison -- with outer-scope reads,
branch initializers and a nested If; a runtime condition stays an opaque node; outputs against
ONNX Runtime, through import and optimize()."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphopt import optimize
from graphopt.core.numerics import exact_tolerance
from graphopt.errors import CaptureError
from graphopt.frontends.onnx import import_onnx

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _ort(model: onnx.ModelProto, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _assert_exact(got: object, ref: np.ndarray) -> None:
    got_t = torch.as_tensor(np.asarray(got)).double()
    assert got_t.shape == ref.shape
    err = float((got_t - torch.as_tensor(ref).double()).abs().max())
    allowed = exact_tolerance(torch.as_tensor(ref))
    assert err <= allowed, f"max abs error {err:.3g} > {allowed:.3g}"


def _graph(nodes, name, outputs, inits=()) -> onnx.GraphProto:
    return helper.make_graph(
        nodes,
        name,
        [],
        [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits],
    )


def _branches(prefix: str = "") -> tuple[onnx.GraphProto, onnx.GraphProto]:
    """then: relu(x) @ W + b_then (W outer, b_then the branch's own initializer);
    else: -x * W_row (W_row outer)."""
    then = _graph(
        [
            helper.make_node("Relu", ["x"], [f"{prefix}t0"]),
            helper.make_node("MatMul", [f"{prefix}t0", "W"], [f"{prefix}t1"]),
            helper.make_node("Add", [f"{prefix}t1", f"{prefix}b_then"], [f"{prefix}t2"]),
        ],
        "then",
        [f"{prefix}t2"],
        [(f"{prefix}b_then", RNG.standard_normal(4).astype(np.float32))],
    )
    other = _graph(
        [
            helper.make_node("Neg", ["x"], [f"{prefix}e0"]),
            helper.make_node("Mul", [f"{prefix}e0", "W_row"], [f"{prefix}e1"]),
        ],
        "else",
        [f"{prefix}e1"],
    )
    return then, other


def _model(cond_nodes, inits=(), x_shape=("N", 4)) -> onnx.ModelProto:
    channels = x_shape[1]
    then, other = _branches()
    nodes = [
        *cond_nodes,
        helper.make_node("If", ["cond"], ["z"], name="choose", then_branch=then, else_branch=other),
        helper.make_node("Sigmoid", ["z"], ["y"]),
    ]
    weights = [
        ("W", RNG.standard_normal((channels, 4)).astype(np.float32)),
        ("W_row", RNG.standard_normal(channels).astype(np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", FLOAT, [None, None])],
        [numpy_helper.from_array(a, n) for n, a in [*weights, *inits]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _check(model: onnx.ModelProto, x: np.ndarray, *, inlined: bool = True) -> None:
    gm = import_onnx(model)
    ops = {n.meta.get("onnx_op") for n in gm.graph.nodes}
    if inlined:
        assert not gm.meta["onnx_opaque"], gm.meta["onnx_opaque"]
        assert "If" not in ops
    else:
        assert list(gm.meta["onnx_opaque"]) == ["choose"]
    with torch.no_grad():
        got = gm(torch.from_numpy(x))
    _assert_exact(got, _ort(model, [x])[0])


@pytest.mark.parametrize("value", [True, False])
def test_constant_node_condition_inlines_the_taken_branch(value: bool) -> None:
    cond = helper.make_node(
        "Constant", [], ["cond"], value=numpy_helper.from_array(np.array(value), "c")
    )
    model = _model([cond])
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    _check(model, x)
    gm = import_onnx(model)
    ops = {n.meta.get("onnx_op") for n in gm.graph.nodes}
    assert ("MatMul" in ops) == value and ("Neg" in ops) != value


@pytest.mark.parametrize("value", [True, False])
def test_initializer_condition(value: bool) -> None:
    _check(
        _model([], inits=[("cond", np.array([value]))]),
        RNG.standard_normal((2, 4)).astype(np.float32),
    )


@pytest.mark.parametrize(("channels", "taken"), [(4, "MatMul"), (5, "Neg")])
def test_shape_derived_condition_is_constant(channels: int, taken: str) -> None:
    """Equal(Gather(Shape(x), 1), 4): x's dim 1 is static, so the importer's shape values make
    the condition a constant (the batch stays symbolic)."""
    cond = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["dim1"], axis=0),
        helper.make_node("Equal", ["dim1", "four"], ["cond"]),
    ]
    inits = [("one", np.array(1, np.int64)), ("four", np.array(4, np.int64))]
    model = _model(cond, inits=inits, x_shape=("N", channels))
    gm = import_onnx(model)
    assert taken in {n.meta.get("onnx_op") for n in gm.graph.nodes}
    for batch in (1, 3):  # the batch stays symbolic through the inlined branch
        _check(model, RNG.standard_normal((batch, channels)).astype(np.float32))


def test_runtime_condition_stays_opaque_and_runs() -> None:
    """ReduceSum(x) > 0 is known only at run time: the If stays an ONNX node (ONNX Runtime
    runs it, with the outer W and W_row as inputs of the call)."""
    cond = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
    ]
    model = _model(cond, inits=[("zero", np.array(0, np.float32))])
    gm = import_onnx(model)
    assert "computed at run time" in gm.meta["onnx_opaque"]["choose"]
    for sign in (1.0, -1.0):  # both branches taken at run time
        x = (np.abs(RNG.standard_normal((2, 4))) * sign).astype(np.float32)
        _check(model, x, inlined=False)


def test_nested_if_reads_outer_values_of_both_scopes() -> None:
    """then branch: an If (constant condition) whose branch reads x (the graph's input), W (an
    outer initializer) and t0 (the enclosing branch's value)."""
    inner_then, inner_else = _branches("in_")
    inner_then.node.insert(0, helper.make_node("Identity", ["t0"], ["in_t0_copy"]))
    inner_then.node[-1].input[0] = "in_t1"
    inner_then.node.append(helper.make_node("Add", ["in_t2", "in_t0_copy"], ["in_out"]))
    del inner_then.output[:]
    inner_then.output.append(helper.make_tensor_value_info("in_out", FLOAT, None))
    then = _graph(
        [
            helper.make_node("Relu", ["x"], ["t0"]),
            helper.make_node(
                "Constant", [], ["inner_cond"], value=numpy_helper.from_array(np.array(True), "c")
            ),
            helper.make_node(
                "If", ["inner_cond"], ["t9"], then_branch=inner_then, else_branch=inner_else
            ),
        ],
        "then",
        ["t9"],
    )
    _, other = _branches()
    nodes = [
        helper.make_node(
            "Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")
        ),
        helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=then, else_branch=other),
    ]
    inits = [
        ("W", RNG.standard_normal((4, 4)).astype(np.float32)),
        ("W_row", RNG.standard_normal(4).astype(np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", FLOAT, [None, None])],
        [numpy_helper.from_array(a, n) for n, a in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"]
    assert "If" not in {n.meta.get("onnx_op") for n in gm.graph.nodes}
    _assert_exact(gm(torch.from_numpy(x)).detach(), _ort(model, [x])[0])


def test_output_read_only_inside_a_branch_is_computed() -> None:
    """MaxPool's Indices read only by the branch: the importer counts a branch's reads as
    consumers, so the converter computes that output."""
    then = _graph([helper.make_node("Cast", ["idx"], ["t0"], to=FLOAT)], "then", ["t0"])
    other = _graph([helper.make_node("Identity", ["pooled"], ["e0"])], "else", ["e0"])
    nodes = [
        helper.make_node("MaxPool", ["x"], ["pooled", "idx"], kernel_shape=[2, 2]),
        helper.make_node(
            "Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")
        ),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 2, 2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"]
    np.testing.assert_array_equal(gm(torch.from_numpy(x)).numpy(), _ort(model, [x])[0])


def test_sequence_output_is_a_clear_capture_error() -> None:
    then = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["s"])],
        "then",
        [],
        [helper.make_tensor_sequence_value_info("s", FLOAT, None)],
    )
    nodes = [
        helper.make_node(
            "Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")
        ),
        helper.make_node(
            "If", ["cond"], ["seq"], name="seq_if", then_branch=then, else_branch=then
        ),
        helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", FLOAT, [None, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(CaptureError, match=r"'seq_if' \(If\).*sequence type"):
        import_onnx(model)


def test_inlined_if_through_optimize_at_two_batch_sizes() -> None:
    cond = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["dim1"], axis=0),
        helper.make_node("Equal", ["dim1", "four"], ["cond"]),
    ]
    inits = [("one", np.array(1, np.int64)), ("four", np.array(4, np.int64))]
    model = _model(cond, inits=inits)
    result = optimize(
        model, example_inputs=[RNG.standard_normal((2, 4)).astype(np.float32)], measure=False
    )
    assert "If" not in {n.op_type for n in result.artifact.proto.graph.node}
    for batch in (2, 5):
        x = RNG.standard_normal((batch, 4)).astype(np.float32)
        _assert_exact(_ort(result.artifact.proto, [x])[0], _ort(model, [x])[0])

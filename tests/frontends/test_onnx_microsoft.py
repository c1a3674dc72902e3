"""com.microsoft converters (graphopt/frontends/onnx/ops/microsoft*.py) against ONNX Runtime
running the original contrib node: one-node models through import and through optimize(), and a
BERT-like model fused by ONNX Runtime's own transformer optimizer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.core.numerics import exact_tolerance
from graphopt.frontends.onnx import import_onnx

FLOAT, INT32 = TensorProto.FLOAT, TensorProto.INT32
MS = "com.microsoft"
RNG = np.random.default_rng(0)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _output(spec: str | tuple[str, int]) -> onnx.ValueInfoProto:
    """An output declared with its rank only (symbolic dims): "name" is 3-D, (name, rank)."""
    name, rank = (spec, 3) if isinstance(spec, str) else spec
    elem = INT32 if name == "mask_index" else FLOAT
    return helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(rank)])


def _model(node, inputs, outputs, inits=()) -> onnx.ModelProto:
    """A one-node model; ``inputs``: (name, array) fed at run time; ``inits``: (name, array)."""
    elem = {np.dtype(np.float32): FLOAT, np.dtype(np.int32): INT32}
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, elem[a.dtype], a.shape) for n, a in inputs],
        [_output(o) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits],
    )
    ids = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=ids, ir_version=10)


def _ort(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _assert_exact(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if w.dtype.kind != "f":
            np.testing.assert_array_equal(g, w)
            continue
        tol = exact_tolerance(torch.from_numpy(w))
        assert float(np.abs(g - w).max()) <= tol, (float(np.abs(g - w).max()), tol)


def check(model: onnx.ModelProto, feeds: list[np.ndarray], optimize: bool = True) -> None:
    """Import (nothing opaque) and optimize(); both equal ONNX Runtime on the original node."""
    want = _ort(model, feeds)
    gm = import_onnx(model)
    assert gm.meta["onnx_opaque"] == {}
    with torch.no_grad():
        got = gm(*[torch.from_numpy(x) for x in feeds])
    got = list(got) if isinstance(got, tuple | list) else [got]
    _assert_exact([g.numpy() for g in got], want)
    if optimize:
        example = tuple(torch.from_numpy(x) for x in feeds)
        result = graphopt.optimize(model, example_inputs=example, measure=False)
        _assert_exact(_ort(result.artifact.proto, feeds), want)


def opaque_reason(model: onnx.ModelProto) -> str:
    (reason,) = import_onnx(model).meta["onnx_opaque"].values()
    return reason


# -- activations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "inputs", "attrs"),
    [
        ("Gelu", ["x"], {}),
        ("BiasGelu", ["x", "b"], {}),
        ("FastGelu", ["x"], {}),
        ("FastGelu", ["x", "b"], {}),
        ("QuickGelu", ["x"], {}),
        ("QuickGelu", ["x"], {"alpha": 1.0}),
    ],
)
def test_activations_equal_onnx_runtime(op: str, inputs: list[str], attrs: dict) -> None:
    x = _randn(2, 5, 16) * 3
    inits = [("b", _randn(16))] if "b" in inputs else []
    node = helper.make_node(op, inputs, ["y"], domain=MS, **attrs)
    check(_model(node, [("x", x)], ["y"], inits), [x])


def test_bias_add_is_the_sum() -> None:  # no CPU kernel in ONNX Runtime: its formula
    x, skip, b = _randn(2, 6, 8), _randn(2, 6, 8), _randn(8)
    node = helper.make_node("BiasAdd", ["x", "b", "s"], ["y"], domain=MS)
    gm = import_onnx(_model(node, [("x", x), ("s", skip)], ["y"], [("b", b)]))
    got = gm(torch.from_numpy(x), torch.from_numpy(skip)).numpy()
    np.testing.assert_array_equal(got, x + b + skip)


# -- normalizations ------------------------------------------------------------------------------


@pytest.mark.parametrize("optional", [(), ("beta",), ("beta", "bias")])
def test_skip_layer_norm_and_its_four_outputs(optional: tuple[str, ...]) -> None:
    x, skip = _randn(2, 5, 16) * 2 + 1, _randn(2, 5, 16)
    names = ["x", "skip", "gamma", "beta" if "beta" in optional else "", "bias"]
    names = names[: 3 + len(optional)]
    inits = [(n, _randn(16)) for n in ("gamma", *optional)]
    node = helper.make_node(
        "SkipLayerNormalization", names, ["y", "mean", "inv", "sum"], domain=MS, epsilon=1e-5
    )
    check(_model(node, [("x", x), ("skip", skip)], ["y", "mean", "inv", "sum"], inits), [x, skip])


def test_skip_layer_norm_with_a_2d_skip_and_one_output() -> None:
    x, skip = _randn(3, 4, 8), _randn(4, 8)
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "b"], ["y"], domain=MS)
    check(
        _model(node, [("x", x), ("skip", skip)], ["y"], [("g", _randn(8)), ("b", _randn(8))]),
        [x, skip],
    )


def test_skip_simplified_layer_norm() -> None:
    x, skip = _randn(2, 5, 16), _randn(2, 5, 16)
    inits = [("gamma", _randn(16)), ("bias", _randn(16))]
    node = helper.make_node(
        "SkipSimplifiedLayerNormalization",
        ["x", "skip", "gamma", "bias"],
        ["y", "", "inv", "sum"],
        domain=MS,
        epsilon=1e-6,
    )
    check(_model(node, [("x", x), ("skip", skip)], ["y", "inv", "sum"], inits), [x, skip])


def test_skip_simplified_layer_norm_refuses_its_undefined_mean_output() -> None:
    x = _randn(2, 3, 8)
    node = helper.make_node(
        "SkipSimplifiedLayerNormalization", ["x", "x", "g"], ["y", "mean"], domain=MS
    )
    reason = opaque_reason(_model(node, [("x", x)], ["y", "mean"], [("g", _randn(8))]))
    assert "SkipSimplifiedLayerNormalization" in reason and "'mean'" in reason


@pytest.mark.parametrize("axis", [-1, 1])
def test_simplified_layer_norm_is_in_the_default_domain(axis: int) -> None:
    x = _randn(2, 4, 6) * 3
    scale = _randn(*(6,) if axis == -1 else (4, 6))
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "s"], ["y", "inv"], axis=axis)
    check(_model(node, [("x", x)], ["y", "inv"], [("s", scale)]), [x])


def test_fused_matmul_transposes_batch_axes_and_scales() -> None:
    # op(A) = (2, 3, 5, 4): A is stored with its first axis behind the batch axes, transposed
    a, b = _randn(4, 2, 3, 5), _randn(2, 3, 4, 6)
    node = helper.make_node(
        "FusedMatMul", ["a", "b"], ["y"], domain=MS, transA=1, transBatchA=1, alpha=0.5
    )
    check(_model(node, [("a", a), ("b", b)], [("y", 4)]), [a, b])
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, transB=1, alpha=2.0)
    a, b = _randn(2, 5, 4), _randn(3, 4)  # B constant (stored transposed), broadcast
    check(_model(node, [("a", a)], [("y", 3)], [("b", b)]), [a])

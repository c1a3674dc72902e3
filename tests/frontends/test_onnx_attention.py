"""ONNX Attention (opset 23) converter against ONNX Runtime, through import and optimize()."""

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
from graphopt.frontends.onnx import import_onnx

RNG = np.random.default_rng(0)
FLOAT = TensorProto.FLOAT


def _ort(model: onnx.ModelProto, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _assert_exact(got: object, ref: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    allowed = exact_tolerance(torch.from_numpy(ref.astype(np.float32)))
    assert err <= allowed, f"max abs error {err:.3g} > {allowed:.3g}"


def _model(nodes, inputs, outputs, inits=(), opset: int = 23) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _import_run(model: onnx.ModelProto, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    with torch.no_grad():
        out = gm(*[torch.from_numpy(f) for f in feeds])
    return [o.numpy() for o in (out if isinstance(out, tuple | list) else [out])]


def _randn(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _gqa_block(heads: int = 4, kv_heads: int = 2, dim: int = 32) -> onnx.ModelProto:
    """A causal grouped-query self-attention block as a user's file has it: x (B, L, dim) ->
    Q/K/V projections (random weights) -> Attention (3-D, q_num_heads/kv_num_heads) -> output
    projection; the batch and the sequence length are dynamic."""
    head = dim // heads
    weights = {
        "wq": _randn(dim, dim, scale=0.2),
        "wk": _randn(dim, kv_heads * head, scale=0.2),
        "wv": _randn(dim, kv_heads * head, scale=0.2),
        "wo": _randn(dim, dim, scale=0.2),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node(
            "Attention",
            ["q", "k", "v"],
            ["a"],
            is_causal=1,
            q_num_heads=heads,
            kv_num_heads=kv_heads,
        ),  # fmt: skip
        helper.make_node("MatMul", ["a", "wo"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["B", "L", dim])],
        [helper.make_tensor_value_info("y", FLOAT, ["B", "L", dim])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )


def test_gqa_causal_block_import_and_optimize_at_two_lengths() -> None:
    model = _gqa_block()
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque")
    for batch, length in ((2, 5), (1, 9)):
        x = _randn(batch, length, 32)
        with torch.no_grad():
            _assert_exact(gm(torch.from_numpy(x)).numpy(), _ort(model, [x])[0])
    x = _randn(2, 5, 32)
    result = optimize(model, example_inputs=[x], measure=False)
    _assert_exact(result(x), _ort(model, [x])[0])


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("mask_type", ["bool", "float"])
def test_4d_mask_past_and_present_and_qk_output(mask_type: str, mode: int) -> None:
    b, h, lq, lpast, d = 2, 3, 4, 3, 8
    feeds = [_randn(b, h, lq, d), _randn(b, h, lq, d), _randn(b, h, lq, d)]
    if mask_type == "bool":
        mask = RNG.random((lq, lpast + lq)) < 0.7
        mask[:, 0] = True  # no fully masked row
        mask_elem = TensorProto.BOOL
    else:
        mask = _randn(b, 1, lq, lpast + lq)
        mask_elem = FLOAT
    feeds += [mask, _randn(b, h, lpast, d), _randn(b, h, lpast, d)]
    names = ["Q", "K", "V", "mask", "past_key", "past_value"]
    types = [FLOAT, FLOAT, FLOAT, mask_elem, FLOAT, FLOAT]
    model = _model(
        [
            helper.make_node(
                "Attention",
                names,
                ["Y", "present_key", "present_value", "qk"],
                scale=0.3,
                softcap=4.0,
                qk_matmul_output_mode=0,
            )
        ],  # fmt: skip
        [
            helper.make_tensor_value_info(n, t, f.shape)
            for n, t, f in zip(names, types, feeds, strict=True)
        ],
        [
            helper.make_tensor_value_info("Y", FLOAT, [b, h, lq, d]),
            helper.make_tensor_value_info("present_key", FLOAT, [b, h, lpast + lq, d]),
            helper.make_tensor_value_info("present_value", FLOAT, [b, h, lpast + lq, d]),
            helper.make_tensor_value_info("qk", FLOAT, [b, h, lq, lpast + lq]),
        ],
    )
    ref = _ort(model, feeds)
    got = _import_run(model, feeds)
    assert len(got) == len(ref) == 4
    for g, r in zip(got, ref, strict=True):
        _assert_exact(g, r)


def test_unsupported_head_counts_are_a_refusal_naming_the_attribute() -> None:
    model = _model(
        [helper.make_node("Attention", ["q", "k", "k"], ["y"], q_num_heads=3, kv_num_heads=2)],
        [
            helper.make_tensor_value_info("q", FLOAT, [1, 4, 6]),
            helper.make_tensor_value_info("k", FLOAT, [1, 4, 4]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4, 6])],
    )
    gm = import_onnx(model)
    reasons = " ".join(gm.meta["onnx_opaque"].values())
    assert "Attention" in reasons and "kv_num_heads" in reasons

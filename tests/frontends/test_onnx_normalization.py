"""ONNX normalization converters (InstanceNormalization, GroupNormalization, RMSNormalization, LRN,
LayerNormalization's extra outputs) against ONNX Runtime, through import and optimize()."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphopt import optimize
from graphopt.core.numerics import exact_tolerance
from graphopt.frontends.onnx import import_onnx

RNG = np.random.default_rng(0)


def _ort(model: onnx.ModelProto | bytes, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _assert_exact(got: object, ref: np.ndarray) -> None:
    got = torch.as_tensor(np.asarray(got)).double()
    ref_t = torch.as_tensor(ref).double()
    assert got.shape == ref_t.shape
    err = float((got - ref_t).abs().max())
    allowed = exact_tolerance(torch.as_tensor(ref))
    assert err <= allowed, f"max abs error {err:.3g} > {allowed:.3g}"


def _single(op: str, inputs: dict[str, np.ndarray], n_out: int, opset: int, **attrs):
    """A one-node model; float32 inputs named in ``inputs`` (the first is the graph input, the
    others initializers), ``n_out`` float32 outputs: the first shaped as the input, the others
    (LayerNormalization's statistics) with size-1 trailing dims."""
    names = list(inputs)
    x = inputs[names[0]]
    node = helper.make_node(op, names, [f"y{j}" for j in range(n_out)], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["N", *x.shape[1:]])],
        [
            helper.make_tensor_value_info(
                f"y{j}", TensorProto.FLOAT, ["N", *x.shape[1:]] if j == 0 else ["N", 3, 1]
            )
            for j in range(n_out)
        ],
        [numpy_helper.from_array(v, k) for k, v in list(inputs.items())[1:]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _check_both_paths(model: onnx.ModelProto, x: np.ndarray, *, optimize_too: bool = True):
    ref = _ort(model, [x])
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    with torch.no_grad():
        got = gm(torch.from_numpy(x))
    got = list(got) if isinstance(got, tuple | list) else [got]
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        _assert_exact(g, r)
    if optimize_too:
        result = optimize(model, example_inputs=[x], measure=False)
        out = result(x)
        out = list(out) if isinstance(out, tuple | list) else [out]
        for g, r in zip(out, ref, strict=True):
            _assert_exact(g, r)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_instance_norm_from_torch_affine_random_weights() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.InstanceNorm2d(6, affine=True), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 3, 9, 9),), f, dynamo=False, opset_version=17,
            input_names=["x"], dynamic_axes={"x": {0: "N"}},
        )  # fmt: skip
    onnx_model = onnx.load_from_string(f.getvalue())
    assert "InstanceNormalization" in [n.op_type for n in onnx_model.graph.node]
    gm = import_onnx(onnx_model)
    for n in (1, 3):
        x = _randn(n, 3, 9, 9)
        with torch.no_grad():
            _assert_exact(gm(torch.from_numpy(x)), _ort(onnx_model, [x])[0])
            _assert_exact(gm(torch.from_numpy(x)), model(torch.from_numpy(x)).numpy())
    x = _randn(2, 3, 9, 9)
    _assert_exact(
        optimize(onnx_model, example_inputs=[x], measure=False)(x), _ort(onnx_model, [x])[0]
    )


@pytest.mark.parametrize("rank", [3, 5])
def test_instance_norm_other_ranks(rank: int) -> None:
    x = _randn(2, 4, *[5] * (rank - 2))
    model = _single(
        "InstanceNormalization", {"x": x, "s": _randn(4), "b": _randn(4)}, 1, 17, epsilon=1e-3
    )
    _check_both_paths(model, x, optimize_too=rank == 3)


def test_group_norm_opset21_scale_is_per_channel() -> None:
    x = _randn(2, 6, 4, 4) * 3 + 1
    model = _single(
        "GroupNormalization",
        {"x": x, "s": _randn(6), "b": _randn(6)},
        1,
        21,
        num_groups=2,
        epsilon=1e-2,
    )
    # per-channel scale: differs from a per-group reading of the same numbers
    _check_both_paths(model, x)


def test_group_norm_unknown_channels_is_a_refusal() -> None:
    x = _randn(2, 6, 4)
    model = _single("GroupNormalization", {"x": x, "s": _randn(6), "b": _randn(6)}, 1, 21,
                    num_groups=2)  # fmt: skip
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    del model.graph.value_info[:]
    gm = import_onnx(model)
    assert "GroupNormalization" in " ".join(gm.meta["onnx_opaque"].values())


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_rms_norm(axis: int) -> None:
    x = _randn(2, 3, 4, 5)
    scale = _randn(*x.shape[axis:]) if axis > 0 else _randn(5)
    model = _single("RMSNormalization", {"x": x, "s": scale}, 1, 23, axis=axis, epsilon=1e-3)
    _check_both_paths(model, x, optimize_too=axis == 1)


def _lrn_spec(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """ONNX's LRN formula, in float64: the channel window [c - floor((size-1)/2),
    c + ceil((size-1)/2)]."""
    x64 = x.astype(np.float64)
    out = np.empty_like(x64)
    for c in range(x.shape[1]):
        lo, hi = max(0, c - (size - 1) // 2), min(x.shape[1], c + size // 2 + 1)
        square_sum = (x64[:, lo:hi] ** 2).sum(axis=1)
        out[:, c] = x64[:, c] / (bias + alpha / size * square_sum) ** beta
    return out.astype(x.dtype)


@pytest.mark.parametrize("size", [3, 5])
def test_lrn(size: int) -> None:
    x = _randn(2, 7, 4, 4) * 4
    model = _single("LRN", {"x": x}, 1, 13, size=size, alpha=0.5, beta=0.75, bias=2.0)
    _assert_exact(_ort(model, [x])[0], _lrn_spec(x, size, 0.5, 0.75, 2.0))  # the spec as read
    _check_both_paths(model, x, optimize_too=size == 5)


def test_lrn_even_window_is_centred_as_onnx_says() -> None:
    # ONNX Runtime refuses an even size; the spec's window is [c - (size-1)//2, c + size//2]
    # (torch's local_response_norm centres it the other way round)
    x = _randn(2, 7, 4, 4) * 4
    model = _single("LRN", {"x": x}, 1, 13, size=4, alpha=0.5, beta=0.75, bias=2.0)
    with torch.no_grad():
        got = import_onnx(model)(torch.from_numpy(x))
    _assert_exact(got, _lrn_spec(x, 4, 0.5, 0.75, 2.0))


def test_layer_norm_mean_and_inv_std_dev_outputs() -> None:
    x = _randn(2, 3, 8) * 5 + 2
    model = _single(
        "LayerNormalization", {"x": x, "s": _randn(8), "b": _randn(8)}, 3, 17, epsilon=1e-3
    )
    _check_both_paths(model, x)


def test_group_normalization_at_opset_18_loads_and_is_exact() -> None:
    """onnx.checker calls GroupNormalization-18 deprecated; ONNX Runtime runs it, so graphopt
    imports it (per-group scale and bias, as opset 18 has them)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    bias = rng.uniform(-1, 1, 3).astype(np.float32)
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 5, 5])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"x": x})
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"]  # converted, not kept opaque
    got = gm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

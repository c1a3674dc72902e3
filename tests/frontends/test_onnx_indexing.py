"""ONNX import of TopK, ArgMax/ArgMin, CumSum, Trilu, GatherElements, ScatterElements, ScatterND,
Einsum and Mod (graphopt/frontends/onnx/ops/indexing.py): each compared with ONNX Runtime on the
original node, on the variants ONNX's own node tests miss (ties, runtime k/axis at other values
than the example's, negative runtime indices, duplicate indices under every reduction, dtypes),
through import and through optimize()'s re-export; and a torch model that uses them, exported by
torch.onnx.export.

Outputs that only move values (TopK, Arg*, Trilu, gathers, scatters without a sum) must be
equal; sums and products within the exact contract (rtol 1e-5 x max|output|).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.frontends.onnx import import_onnx

FLOAT, INT64, INT32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
RTOL = 1e-5  # the exact contract: rtol x max|output|


def _node_model(op, inputs, n_out=1, inits=(), opset=18, **attrs) -> onnx.ModelProto:
    """A one-node model; ``inputs``: (name, elem type, shape) of the graph inputs."""
    names = [n for n, _, _ in inputs] + [n for n, _ in inits]
    outs = [f"y{j}" for j in range(n_out)]
    graph = helper.make_graph(
        [helper.make_node(op, names, outs, name="node", **attrs)],
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [onnx.ValueInfoProto(name=o) for o in outs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)  # the outputs' types


def _ort(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _imported(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    with torch.no_grad():
        out = gm(*[torch.from_numpy(np.array(f)) for f in feeds])
    return [o.numpy() for o in (out if isinstance(out, tuple | list) else [out])]


def _close(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        if w.dtype.kind == "f":
            scale = float(np.abs(w).max()) if w.size else 0.0
            np.testing.assert_allclose(g, w, rtol=0, atol=RTOL * scale)
        else:
            np.testing.assert_array_equal(g, w)


def _equal(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert np.asarray(g).dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def _optimized(model: onnx.ModelProto, example):
    """optimize()'s artifact as a function returning a list of arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = graphopt.optimize(model, example_inputs=example, measure=False)

    def run(*feeds):
        out = result(*feeds)
        return list(out) if isinstance(out, tuple | list) else [out]

    return run


def _ties(shape, seed=0) -> np.ndarray:
    """Floats with many ties: small integers."""
    return np.random.default_rng(seed).integers(-2, 3, shape).astype(np.float32)


# --------------------------------------------------------------------------- TopK


@pytest.mark.parametrize("largest", [1, 0])
@pytest.mark.parametrize("axis", [1, -1, 0])
def test_topk_ties_come_lower_index_first(largest: int, axis: int) -> None:
    x = _ties((7, 40))
    model = _node_model(
        "TopK", [("x", FLOAT, [7, 40]), ("k", INT64, [1])], 2, axis=axis, largest=largest
    )
    feeds = [x, np.array([5], np.int64)]
    want = _ort(model, feeds)
    _equal(_imported(model, feeds), want)


def test_topk_runtime_k_is_not_frozen_by_the_export() -> None:
    x = _ties((3, 30), seed=1)
    model = _node_model("TopK", [("x", FLOAT, ["N", 30]), ("k", INT64, [1])], 2, axis=1)
    result = _optimized(model, [x, np.array([4], np.int64)])
    for k in (1, 4, 17, 30):
        feeds = [_ties((3, 30), seed=k), np.array([k], np.int64)]
        _equal(result(*feeds), _ort(model, feeds))


def test_topk_sorted_0_stays_an_onnx_node_naming_sorted() -> None:
    model = _node_model("TopK", [("x", FLOAT, [2, 50])], 2, [("k", np.array([7]))], sorted=0)
    gm = import_onnx(model)
    assert "sorted=0" in gm.meta["onnx_opaque"]["node"]
    x = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
    with torch.no_grad():
        got = [t.numpy() for t in gm(torch.from_numpy(x))]
    _equal(got, _ort(model, [x]))


# --------------------------------------------------------------------------- ArgMax / ArgMin


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("last", [0, 1])
@pytest.mark.parametrize("axis,keepdims", [(0, 1), (1, 0), (-1, 1), (-2, 0)])
def test_arg_extremes_with_ties(op: str, last: int, axis: int, keepdims: int) -> None:
    x = _ties((2, 6, 5), seed=2)
    model = _node_model(
        op, [("x", FLOAT, [2, 6, 5])], axis=axis, keepdims=keepdims, select_last_index=last
    )
    _equal(_imported(model, [x]), _ort(model, [x]))


# --------------------------------------------------------------------------- CumSum


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
def test_cumsum_variants_with_a_constant_axis(exclusive: int, reverse: int, dtype) -> None:
    x = (np.random.default_rng(3).standard_normal((3, 5, 4)) * 10).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for axis in (1, -1, 0):
        model = _node_model(
            "CumSum",
            [("x", elem, [3, 5, 4])],
            inits=[("axis", np.array(axis, np.int64))],
            exclusive=exclusive,
            reverse=reverse,
        )
        _close(_imported(model, [x]), _ort(model, [x]))  # dtype kept (int32 stays int32)


def test_cumsum_runtime_axis_is_not_frozen_by_the_export() -> None:
    rng = np.random.default_rng(4)
    model = _node_model(
        "CumSum", [("x", FLOAT, ["N", 3, 4]), ("axis", INT32, [])], exclusive=1, reverse=1
    )
    x = rng.standard_normal((3, 3, 4)).astype(np.float32)
    result = _optimized(model, [x, np.array(1, np.int32)])
    for axis in (-3, -1, 0, 1, 2):
        feeds = [rng.standard_normal((3, 3, 4)).astype(np.float32), np.array(axis, np.int32)]
        want = _ort(model, feeds)
        _close(_imported(model, feeds), want)
        _close(result(*feeds), want)


# --------------------------------------------------------------------------- Trilu


@pytest.mark.parametrize("upper", [0, 1])
def test_trilu_runtime_k_is_not_frozen_by_the_export(upper: int) -> None:
    rng = np.random.default_rng(5)
    model = _node_model("Trilu", [("x", FLOAT, ["N", 4, 6]), ("k", INT64, [])], upper=upper)
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    result = _optimized(model, [x, np.array(1, np.int64)])
    for k in (-7, -2, 0, 1, 3, 9):
        feeds = [rng.standard_normal((3, 4, 6)).astype(np.float32), np.array(k, np.int64)]
        want = _ort(model, feeds)
        _equal(_imported(model, feeds), want)
        _equal(result(*feeds), want)


@pytest.mark.parametrize("k", [None, -1, 2])
def test_trilu_constant_k_on_integers_and_bools(k) -> None:
    x = np.arange(2 * 3 * 5, dtype=np.int64).reshape(2, 3, 5)
    inits = [] if k is None else [("k", np.array(k, np.int64))]
    for upper in (0, 1):
        model = _node_model("Trilu", [("x", INT64, [2, 3, 5])], inits=inits, upper=upper)
        _equal(_imported(model, [x]), _ort(model, [x]))
        b = x % 3 == 0
        model = _node_model("Trilu", [("x", TensorProto.BOOL, [2, 3, 5])], inits=inits, upper=upper)
        _equal(_imported(model, [b]), _ort(model, [b]))


# --------------------------------------------------------------------------- gathers, scatters


@pytest.mark.parametrize("index_type", [INT64, INT32])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_negative_runtime_and_constant_indices(index_type: int, axis: int) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 5, 3)).astype(np.float32)
    n = x.shape[axis]
    np_type = np.int64 if index_type == INT64 else np.int32
    index = rng.integers(-n, n, (4, 5, 3)).astype(np_type)
    assert (index < 0).any()
    model = _node_model(
        "GatherElements", [("x", FLOAT, [4, 5, 3]), ("i", index_type, [4, 5, 3])], axis=axis
    )
    _equal(_imported(model, [x, index]), _ort(model, [x, index]))
    const = _node_model(
        "GatherElements", [("x", FLOAT, [4, 5, 3])], inits=[("i", index)], axis=axis
    )
    _equal(_imported(const, [x]), _ort(const, [x]))


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements_reductions_with_duplicate_negative_indices(reduction: str) -> None:
    rng = np.random.default_rng(7)
    data = rng.standard_normal((3, 6)).astype(np.float32)
    updates = rng.standard_normal((3, 4)).astype(np.float32)
    # duplicates (2 and -4 are the same column) only where a reduction defines the result
    index = np.array([[2, -4, 0, 5], [-1, 1, 1, 3], [0, -6, 4, 4]], np.int64)
    if reduction == "none":
        index = np.array([[2, -1, 0, 4], [-1, 1, 2, 3], [0, -5, 4, 5]], np.int64)
    model = _node_model(
        "ScatterElements",
        [("d", FLOAT, [3, 6]), ("i", INT64, [3, 4]), ("u", FLOAT, [3, 4])],
        axis=1,
        reduction=reduction,
    )
    feeds = [data, index, updates]
    _close(_imported(model, feeds), _ort(model, feeds))


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_scatter_nd_reductions_depths_and_negative_indices(reduction: str, depth: int) -> None:
    rng = np.random.default_rng(8)
    shape = (4, 3, 5)
    data = rng.standard_normal(shape).astype(np.float32)
    rows = [(0, -1, 2), (-4, 1, -5), (3, 2, 0), (1, 0, 4)]  # -4 is 0 on axis 0: a duplicate
    if reduction == "none":
        rows = rows[1:]
    index = np.array([r[:depth] for r in rows], np.int64).reshape(len(rows), 1, depth)
    if depth == 1 and reduction == "none":
        index = np.array([[[1]], [[-1]], [[2]]], np.int64)
    updates = rng.standard_normal(index.shape[:-1] + shape[depth:]).astype(np.float32)
    model = _node_model(
        "ScatterND",
        [
            ("d", FLOAT, list(shape)),
            ("i", INT64, list(index.shape)),
            ("u", FLOAT, list(updates.shape)),
        ],
        reduction=reduction,
    )
    feeds = [data, index, updates]
    _close(_imported(model, feeds), _ort(model, feeds))


def test_scatter_nd_through_optimize_keeps_runtime_indices() -> None:
    rng = np.random.default_rng(9)
    model = _node_model(
        "ScatterND",
        [("d", FLOAT, [5, 4]), ("i", INT64, [3, 1]), ("u", FLOAT, [3, 4])],
        reduction="add",
    )

    def feeds(index):
        return [
            rng.standard_normal((5, 4)).astype(np.float32),
            np.array(index, np.int64).reshape(3, 1),
            rng.standard_normal((3, 4)).astype(np.float32),
        ]

    result = _optimized(model, feeds([0, -1, 0]))
    for index in ([4, -5, 2], [1, 1, 1]):
        f = feeds(index)
        _close(result(*f), _ort(model, f))


# --------------------------------------------------------------------------- Einsum, Mod


@pytest.mark.parametrize(
    "equation,shapes",
    [
        ("bij, bjk -> bik", [(2, 3, 4), (2, 4, 5)]),
        ("...ii->...i", [(2, 3, 3)]),
        ("ij,kj", [(3, 4), (5, 4)]),  # implicit output: "ik"
        ("i,i->", [(6,), (6,)]),
        ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)]),
    ],
)
def test_einsum_equations(equation: str, shapes) -> None:
    rng = np.random.default_rng(10)
    feeds = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    inputs = [(f"x{k}", FLOAT, list(s)) for k, s in enumerate(shapes)]
    model = _node_model("Einsum", inputs, equation=equation)
    _close(_imported(model, feeds), _ort(model, feeds))


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.float32, np.float64])
def test_mod_signs_and_dtypes(fmod: int, dtype) -> None:
    a = np.array([-7, -5, -1, 0, 3, 5, 7, 100, -100], dtype)
    b = np.array([3, -3, 4, -2, -5, 5, -2, 7, -9], dtype)
    elem = helper.np_dtype_to_tensor_dtype(a.dtype)
    # opset 28: ONNX Runtime takes fmod=0 on floats only from there
    model = _node_model("Mod", [("a", elem, [9]), ("b", elem, [9])], opset=28, fmod=fmod)
    got = _imported(model, [a, b])
    _equal(got, _ort(model, [a, b]))  # integer dtypes kept
    _equal(got, [np.fmod(a, b) if fmod else np.mod(a, b)])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_mod_fmod_0_on_floats_is_numpys_mod(dtype) -> None:
    a = np.array([-4.3, 7.2, 5.0, 4.3, -7.2, 8.0, 0.0, -0.0, -3.0, 1.0, 6.0, -6.0], dtype)
    b = np.array([2.1, -3.4, 8.0, -2.1, 3.4, 5.0, -2.0, 2.0, np.inf, -np.inf, 3.0, 3.0], dtype)
    elem = helper.np_dtype_to_tensor_dtype(a.dtype)
    model = _node_model("Mod", [("a", elem, [12]), ("b", elem, [12])], opset=28, fmod=0)
    (got,) = _imported(model, [a, b])
    want = np.mod(a, b)
    np.testing.assert_array_equal(got, want)
    _equal([got], _ort(model, [a, b]))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.0 for b < 0


# --------------------------------------------------------------------------- a torch model


class _Net(torch.nn.Module):
    """Uses every op of the module, as torch.onnx.export writes them (opset 17)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("rows", torch.tensor([2, 0]))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.proj(x)  # [B, 6, 8]
        values, indices = torch.topk(h, 3, dim=-1)  # TopK
        first = torch.argmax(h, dim=1, keepdim=True)  # ArgMax
        low = torch.argmin(h, dim=-1)  # ArgMin
        running = torch.cumsum(h, dim=1)  # CumSum
        upper = torch.triu(h[:, :, :6], 1) + torch.tril(h[:, :, 2:], -1)  # Trilu
        picked = torch.gather(h, 2, idx)  # GatherElements
        peak = torch.scatter_reduce(h, 2, idx, picked * 2, "amax")  # ScatterElements, max
        put = torch.scatter(h, 2, idx[:, :, :1], picked[:, :, :1])  # ScatterElements
        nd = h.clone()
        nd[:, self.rows] = h[:, :2] * 3  # index_put -> ScatterND
        attn = torch.einsum("bij,bkj->bik", h, h)  # Einsum
        wrapped = torch.remainder(idx - 4, 3) + torch.fmod(idx - 4, 3)  # Mod fmod=0 / 1
        ring = torch.fmod(h, 0.7)  # Mod fmod=1 on floats
        return values, indices, first, low, running, upper, peak, put, nd, attn, wrapped, ring


def _exported_net() -> tuple[onnx.ModelProto, list[np.ndarray]]:
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 6, 8)
    idx = torch.randint(0, 8, (2, 6, 3))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x, idx),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x", "idx"],
            output_names=[f"out{k}" for k in range(12)],
            dynamic_axes={"x": {0: "batch"}, "idx": {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue()), [x.numpy(), idx.numpy()]


def test_torch_exported_model_imports_and_optimizes_like_onnx_runtime() -> None:
    model, feeds = _exported_net()
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "ArgMax", "ArgMin", "CumSum", "Trilu", "GatherElements"} <= ops
    assert {"ScatterElements", "ScatterND", "Einsum", "Mod"} <= ops
    want = _ort(model, feeds)
    gm = import_onnx(model)
    ours = {n.meta.get("onnx_op") for n in gm.graph.nodes} - {None}
    assert {"TopK", "ArgMax", "CumSum", "Trilu", "GatherElements", "ScatterND", "Mod"} <= ours
    with torch.no_grad():
        got = [t.numpy() for t in gm(*[torch.from_numpy(f) for f in feeds])]
    _close(got, want)
    result = _optimized(model, feeds)
    rng = np.random.default_rng(11)
    other = [rng.standard_normal((3, 6, 8)).astype(np.float32), rng.integers(0, 8, (3, 6, 3))]
    _close(result(*other), _ort(model, other))  # another batch size


def test_indices_along_a_dynamic_axis_follow_its_size_after_export() -> None:
    """Negative indices and last-index ties count from the axis' size at run time, which the
    export must not freeze at the example's (4 rows here; the artifact runs at 7)."""
    rng = np.random.default_rng(12)
    cases = [
        (
            _node_model("GatherElements", [("x", FLOAT, ["N", 3]), ("i", INT64, ["N", 3])]),
            lambda n: [rng.standard_normal((n, 3)).astype(np.float32), rng.integers(-n, n, (n, 3))],
        ),
        (
            _node_model(
                "ScatterND",
                [("d", FLOAT, ["N", 3]), ("i", INT64, [2, 1]), ("u", FLOAT, [2, 3])],
                reduction="add",
            ),
            lambda n: [
                rng.standard_normal((n, 3)).astype(np.float32),
                np.array([[-1], [1]], np.int64),
                rng.standard_normal((2, 3)).astype(np.float32),
            ],
        ),
        (
            _node_model("ArgMax", [("x", FLOAT, ["N", 3])], keepdims=0, select_last_index=1),
            lambda n: [_ties((n, 3), seed=n)],
        ),
    ]
    for model, feeds in cases:
        run = _optimized(model, feeds(4))
        for n in (4, 7):
            f = feeds(n)
            _close(run(*f), _ort(model, f))

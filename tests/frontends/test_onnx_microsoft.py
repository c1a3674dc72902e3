"""com.microsoft converters (graphopt/frontends/onnx/ops/microsoft*.py) against ONNX Runtime
running the original contrib node: one-node models through import and through optimize(), and a
BERT-like model fused by ONNX Runtime's own transformer optimizer."""

from __future__ import annotations

import itertools

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


def check_import(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[np.ndarray]:
    """Import (nothing opaque): equal to ONNX Runtime on the original node; its outputs."""
    want = _ort(model, feeds)
    gm = import_onnx(model)
    assert gm.meta["onnx_opaque"] == {}
    with torch.no_grad():
        got = gm(*[torch.from_numpy(x) for x in feeds])
    got = list(got) if isinstance(got, tuple | list) else [got]
    _assert_exact([g.numpy() for g in got], want)
    return want


def check(model: onnx.ModelProto, feeds: list[np.ndarray]) -> None:
    """Import and optimize(); both equal ONNX Runtime on the original node."""
    want = check_import(model, feeds)
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


@pytest.mark.parametrize("rank", [3, 4])
def test_fused_matmul_every_transpose_combination(rank: int) -> None:
    # op(A) = (2, 3, 5, 4)[-rank:], op(B) = (2, 3, 4, 6)[-rank:]: no two axes of a size, so a
    # wrong permutation cannot go unnoticed
    for flags in itertools.product((0, 1), repeat=4):
        ta, tb, tba, tbb = flags
        a = _stored((2, 3, 5, 4)[-rank:], ta, tba)
        b = _stored((2, 3, 4, 6)[-rank:], tb, tbb)
        attrs = dict(zip(("transA", "transB", "transBatchA", "transBatchB"), flags, strict=True))
        node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, alpha=0.7, **attrs)
        check_import(_model(node, [("a", a), ("b", b)], [("y", rank)]), [a, b])


def _stored(shape: tuple[int, ...], trans: int, trans_batch: int) -> np.ndarray:
    """A random operand whose FusedMatMul op() has ``shape``."""
    rank = len(shape)
    perm = [*range(1, rank - 1), 0, rank - 1] if trans_batch else list(range(rank))
    if trans:
        perm[-2], perm[-1] = perm[-1], perm[-2]
    stored = [0] * rank
    for axis, source in enumerate(perm):
        stored[source] = shape[axis]
    return _randn(*stored)


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


# -- attention -----------------------------------------------------------------------------------

B, S, HIDDEN, HEADS = 2, 5, 16, 4


def _attention_model(mask=None, sizes=None, attn_bias=False, **attrs) -> tuple:
    """Attention over x (B, S, 12) with constant W, b; ``mask``: the mask_index array, fed."""
    q, k, v = sizes or (HIDDEN, HIDDEN, HIDDEN)
    x = _randn(B, S, 12)
    inputs = [("x", x)] + ([("mask", mask)] if mask is not None else [])
    if attn_bias:
        inputs.append(("attn_bias", _randn(1, HEADS, S, S)))
    names = ["x", "W", "b", "mask" if mask is not None else ""]
    names += ["", "attn_bias"] if attn_bias else []
    if sizes:
        attrs["qkv_hidden_sizes"] = list(sizes)
    node = helper.make_node("Attention", names, ["y"], domain=MS, num_heads=HEADS, **attrs)
    inits = [("W", _randn(12, q + k + v) * 0.5), ("b", _randn(q + k + v))]
    return _model(node, inputs, ["y"], inits), [a for _, a in inputs]


LENGTHS = np.array([3, 0], np.int32)  # batch 1 fully masked: the mask is added, not substituted
RAW2 = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], np.int32)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"mask": LENGTHS},
        {"mask": RAW2},
        {"mask": (RNG.random((B, S, S)) > 0.4).astype(np.int32)},
        {"mask": RAW2, "unidirectional": 1, "mask_filter_value": -1e4 * 3},
        {"sizes": (HIDDEN, HIDDEN, 8), "scale": 0.3, "attn_bias": True},
    ],
    ids=["plain", "lengths", "raw2d", "raw3d", "causal", "sizes-scale-bias"],
)
def test_attention_equals_onnx_runtime(variant: dict) -> None:
    model, feeds = _attention_model(**variant)
    check(model, feeds)


@pytest.mark.parametrize(
    ("names", "what"),
    [(["x", "W", "b", "", "past"], "'past'"), (["x", "W", "b", "mask"], "left padding")],
)
def test_attention_refusals_name_the_input(names: list[str], what: str) -> None:
    x, past = _randn(B, S, 12), _randn(2, B, HEADS, 3, 4)
    inputs = [("x", x), ("past", past), ("mask", np.full(2 * B, S, np.int32))]
    node = helper.make_node("Attention", names, ["y"], domain=MS, num_heads=HEADS)
    inits = [("W", _randn(12, 48)), ("b", _randn(48))]
    model = _model(node, [i for i in inputs if i[0] in names], ["y"], inits)
    reason = opaque_reason(model)
    assert "Attention" in reason and what in reason


@pytest.mark.parametrize("mask", [None, RAW2, LENGTHS], ids=["none", "raw2d", "lengths"])
def test_multi_head_attention_equals_onnx_runtime(mask: np.ndarray | None) -> None:
    q, k, v = _randn(B, S, HIDDEN), _randn(B, S, HIDDEN), _randn(B, S, 8)
    inputs = [("q", q), ("k", k), ("v", v)] + ([("mask", mask)] if mask is not None else [])
    names = ["q", "k", "v", "b"] + (["mask"] if mask is not None else [])
    node = helper.make_node("MultiHeadAttention", names, ["y"], domain=MS, num_heads=HEADS)
    model = _model(node, inputs, ["y"], [("b", _randn(2 * HIDDEN + 8))])
    check(model, [a for _, a in inputs])


def test_multi_head_attention_refuses_packed_qkv() -> None:
    qkv = _randn(B, S, HEADS, 3, 4)
    node = helper.make_node("MultiHeadAttention", ["qkv"], ["y"], domain=MS, num_heads=HEADS)
    reason = opaque_reason(_model(node, [("qkv", qkv)], ["y"]))
    assert "MultiHeadAttention" in reason and "packed" in reason


# -- EmbedLayerNormalization ---------------------------------------------------------------------


@pytest.mark.parametrize("segments", [True, False])
def test_embed_layer_norm_and_its_mask_index(segments: bool) -> None:
    ids = RNG.integers(0, 30, (B, S)).astype(np.int32)
    seg = RNG.integers(0, 2, (B, S)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.int32)
    names = ["ids", "seg" if segments else "", "word", "pos", "segemb" if segments else ""]
    names += ["gamma", "beta", "mask"]
    inits = [("word", _randn(30, HIDDEN)), ("pos", _randn(S + 3, HIDDEN))]
    inits += [("segemb", _randn(2, HIDDEN))] if segments else []
    inits += [("gamma", _randn(HIDDEN)), ("beta", _randn(HIDDEN))]
    inputs = [("ids", ids)] + ([("seg", seg)] if segments else []) + [("mask", mask)]
    node = helper.make_node(
        "EmbedLayerNormalization", names, ["y", "mask_index", "sum"], domain=MS, epsilon=1e-5
    )
    model = _model(node, inputs, ["y", ("mask_index", 1), "sum"], inits)
    check(model, [a for _, a in inputs])


# -- a BERT-like model fused by ONNX Runtime's transformer optimizer ------------------------------


class _Layer(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, gelu: str) -> None:
        super().__init__()
        self.heads, self.gelu = heads, gelu
        self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)
        self.up, self.down = (
            torch.nn.Linear(hidden, 4 * hidden),
            torch.nn.Linear(4 * hidden, hidden),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads
        q = self.q(x).view(b, s, self.heads, d).permute(0, 2, 1, 3)
        k = self.k(x).view(b, s, self.heads, d).permute(0, 2, 3, 1)
        v = self.v(x).view(b, s, self.heads, d).permute(0, 2, 1, 3)
        p = torch.softmax(torch.matmul(q, k) / d**0.5 + mask, dim=-1)
        c = torch.matmul(p, v).permute(0, 2, 1, 3).reshape(b, s, h)
        x = self.ln1(x + self.o(c))
        return self.ln2(x + self.down(torch.nn.functional.gelu(self.up(x), approximate=self.gelu)))


class _Bert(torch.nn.Module):
    """Embeddings (word, position, token type) + LayerNorm, then 2 post-LN transformer layers."""

    def __init__(self, gelu: str, vocab: int = 100, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.word, self.pos = torch.nn.Embedding(vocab, hidden), torch.nn.Embedding(64, hidden)
        self.token_type, self.ln = torch.nn.Embedding(2, hidden), torch.nn.LayerNorm(hidden)
        self.layers = torch.nn.ModuleList(_Layer(hidden, heads, gelu) for _ in range(2))

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        x = self.ln(self.word(ids) + self.pos(pos) + self.token_type(types))
        mask = (1.0 - attn[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _bert_inputs(batch: int, seq: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (batch, seq))
    attn = np.ones((batch, seq), np.int64)
    attn[0, seq - 2 :] = 0  # right padding
    types = (np.arange(seq)[None, :] >= seq // 2).repeat(batch, 0).astype(np.int64)
    return [ids, attn, types]


# erf GELU (fused as BiasGelu) and tanh GELU (fused as FastGelu with a bias)
@pytest.fixture(scope="module", params=["none", "tanh"])
def fused_bert(request, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    torch.manual_seed(0)
    model = _Bert(request.param).eval()
    with torch.no_grad():  # trained-looking LayerNorms, not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model,
        tuple(torch.from_numpy(a) for a in _bert_inputs(2, 7, 0)),
        str(path),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]},
        opset_version=17,
        dynamo=False,
    )
    fused = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=32)
    return fused.model


def test_bert_fused_by_onnx_runtime_imports_without_opaque_nodes(fused_bert) -> None:
    from graphopt.frontends.onnx.ops import CONTRIB_OPS

    ops = {(n.domain, n.op_type) for n in fused_bert.graph.node if n.domain == MS}
    emitted = {op for _, op in ops}
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization"} <= emitted
    assert emitted & {"BiasGelu", "FastGelu"}
    assert all(f"{MS}::{op}" in CONTRIB_OPS for op in emitted)
    gm = import_onnx(fused_bert)
    assert gm.meta["onnx_opaque"] == {}
    for batch, seq, seed in ((2, 7, 1), (3, 11, 2)):
        feeds = _bert_inputs(batch, seq, seed)
        with torch.no_grad():
            got = gm(*[torch.from_numpy(a) for a in feeds])
        _assert_exact([got.numpy()], _ort(fused_bert, feeds))


def test_bert_fused_by_onnx_runtime_through_optimize(fused_bert) -> None:
    feeds = _bert_inputs(2, 7, 1)
    result = graphopt.optimize(
        fused_bert, example_inputs=tuple(torch.from_numpy(a) for a in feeds), measure=False
    )
    proto = result.artifact.proto
    assert not [n.op_type for n in proto.graph.node if n.domain == MS]
    for batch, seq, seed in ((2, 7, 1), (3, 11, 2)):
        feeds = _bert_inputs(batch, seq, seed)
        _assert_exact(_ort(proto, feeds), _ort(fused_bert, feeds))


def test_contrib_outputs_carry_their_dtype_to_converters_downstream() -> None:
    # ONNX's shape inference types no contrib output; DynamicQuantizeLinear (what ONNX Runtime's
    # quantize_dynamic puts after a fused SkipLayerNormalization) needs its input's dtype
    x, skip = _randn(2, 5, 16), _randn(2, 5, 16)
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "skip", "g"], ["n"], domain=MS),
        helper.make_node("DynamicQuantizeLinear", ["n"], ["q", "scale", "zero"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, FLOAT, [2, 5, 16]) for n in ("x", "skip")],
        [
            helper.make_tensor_value_info("q", TensorProto.UINT8, [2, 5, 16]),
            helper.make_tensor_value_info("scale", FLOAT, []),
            helper.make_tensor_value_info("zero", TensorProto.UINT8, []),
        ],
        [numpy_helper.from_array(_randn(16), "g")],
    )
    ids = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=ids, ir_version=10)
    gm = import_onnx(model)
    assert gm.meta["onnx_opaque"] == {}
    got = [t.numpy() for t in gm(torch.from_numpy(x), torch.from_numpy(skip))]
    _assert_exact(got, _ort(model, [x, skip]))


def test_embed_layer_norm_with_position_ids() -> None:
    ids = RNG.integers(0, 30, (B, S)).astype(np.int32)
    positions = np.array([[4, 3, 2, 1, 0]], np.int32)  # (1, S): broadcast over the batch
    names = ["ids", "", "word", "pos", "", "gamma", "beta", "", "positions"]
    inits = [("word", _randn(30, HIDDEN)), ("pos", _randn(S, HIDDEN))]
    inits += [("gamma", _randn(HIDDEN)), ("beta", _randn(HIDDEN))]
    # ONNX Runtime's shape inference wants a mask_index output, even without a mask
    node = helper.make_node("EmbedLayerNormalization", names, ["y", "unused"], domain=MS)
    check(_model(node, [("ids", ids), ("positions", positions)], ["y"], inits), [ids, positions])


def test_attention_with_runtime_weights() -> None:
    x, w = _randn(B, S, 12), _randn(12, 3 * HIDDEN)
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=HEADS)
    model = _model(node, [("x", x), ("w", w)], ["y"], [("b", _randn(3 * HIDDEN))])
    check(model, [x, w])


def test_multi_head_cross_attention_with_a_3d_mask_and_attention_bias() -> None:
    keys = S + 2  # the keys are longer than the queries
    q, k, v = _randn(B, S, HIDDEN), _randn(B, keys, HIDDEN), _randn(B, keys, HIDDEN)
    mask = (RNG.random((B, S, keys)) > 0.3).astype(np.int32)
    bias = _randn(B, 1, S, keys)
    inputs = [("q", q), ("k", k), ("v", v), ("mask", mask), ("attn_bias", bias)]
    node = helper.make_node(
        "MultiHeadAttention",
        ["q", "k", "v", "", "mask", "attn_bias"],
        ["y"],
        domain=MS,
        num_heads=HEADS,
        scale=0.2,
    )
    check(_model(node, inputs, ["y"]), [a for _, a in inputs])


# -- FusedConv, FusedGemm (ONNX Runtime's graph optimizer) -----------------------------------------


@pytest.mark.parametrize(
    ("activation", "params"),
    [
        ("", []),
        ("Relu", []),
        ("Tanh", []),
        ("Sigmoid", []),
        ("LeakyRelu", [0.1]),
        ("Clip", [-0.5, 1.5]),
        ("HardSigmoid", [0.3, 0.4]),
    ],
)
def test_fused_conv_with_its_activation_and_sum(activation: str, params: list[float]) -> None:
    x, z = _randn(2, 3, 9, 9), _randn(2, 8, 5, 9)
    inits = [("w", _randn(8, 3, 3, 3) * 0.3), ("b", _randn(8))]
    attrs = {"activation": activation} if activation else {}
    attrs |= {"activation_params": params} if params else {}
    node = helper.make_node(
        "FusedConv",
        ["x", "w", "b", "z"],
        ["y"],
        domain=MS,
        strides=[2, 1],
        pads=[1, 1, 1, 1],
        **attrs,
    )
    check(_model(node, [("x", x), ("z", z)], [("y", 4)], inits), [x, z])


@pytest.mark.parametrize(
    ("activation", "attrs"),
    [("Relu", {}), ("LeakyRelu", {"activation_alpha": 0.2}), ("Sigmoid", {})],
)
def test_fused_gemm_with_its_activation(activation: str, attrs: dict) -> None:
    a = _randn(4, 6)
    node = helper.make_node(
        "FusedGemm",
        ["a", "w", "c"],
        ["y"],
        domain=MS,
        transB=1,
        alpha=0.5,
        activation=activation,
        **attrs,
    )
    inits = [("w", _randn(5, 6)), ("c", _randn(5))]
    check(_model(node, [("a", a)], [("y", 2)], inits), [a])


def test_a_cnn_saved_by_an_onnx_runtime_session_with_fused_conv_and_gemm(tmp_path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.Sigmoid(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 4),
    ).eval()
    with torch.no_grad():  # random statistics (ONNX Runtime folds the BatchNorm into the Conv)
        net[1].running_mean.normal_(0, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_(0, 0.5)
    exported, saved = tmp_path / "cnn.onnx", tmp_path / "cnn_ort.onnx"
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 8, 8),),
        str(exported),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(saved))
    assert {"FusedConv", "FusedGemm"} <= {n.op_type for n in model.graph.node if n.domain == MS}
    check(model, [_randn(3, 3, 8, 8)])


def test_multi_head_attention_after_a_contrib_op_whose_output_shape_is_unknown() -> None:
    # ONNX's shape inference stops at the com.microsoft Gelu: the query's rank and hidden size
    # are known only when the graph runs
    q, k, v = _randn(B, S, HIDDEN), _randn(B, S, HIDDEN), _randn(B, S, 8)
    nodes = [
        helper.make_node("Gelu", ["q"], ["g"], domain=MS),
        helper.make_node("MultiHeadAttention", ["g", "k", "v", "b"], ["y"], domain=MS, num_heads=2),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(n, FLOAT, a.shape)
            for n, a in (("q", q), ("k", k), ("v", v))
        ],
        [_output("y")],
        [numpy_helper.from_array(_randn(2 * HIDDEN + 8), "b")],
    )
    ids = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    check(helper.make_model(graph, opset_imports=ids, ir_version=10), [q, k, v])


def test_fused_matmul_after_a_contrib_op_whose_output_rank_is_unknown() -> None:
    a, b = _randn(4, 2, 3, 5), _randn(2, 3, 4, 6)
    nodes = [
        helper.make_node("QuickGelu", ["a"], ["g"], domain=MS),
        helper.make_node(
            "FusedMatMul", ["g", "b"], ["y"], domain=MS, transA=1, transBatchA=1, alpha=0.5
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, FLOAT, x.shape) for n, x in (("a", a), ("b", b))],
        [_output(("y", 4))],
    )
    ids = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    check(helper.make_model(graph, opset_imports=ids, ir_version=10), [a, b])


class _RMSNorm(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(hidden) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _RMSBlocks(torch.nn.Module):
    """Two pre-RMSNorm residual blocks (T5/LLaMA style), then a final RMSNorm."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.norms = torch.nn.ModuleList(_RMSNorm(hidden) for _ in range(3))
        self.linears = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, linear in zip(self.norms, self.linears, strict=False):
            x = x + linear(norm(x))
        return self.norms[2](x)


def test_rms_norm_blocks_fused_by_onnx_runtime(tmp_path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    torch.manual_seed(0)
    path = tmp_path / "rms.onnx"
    torch.onnx.export(
        _RMSBlocks().eval(),
        (torch.randn(2, 5, 16),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
        opset_version=17,
        dynamo=False,
    )
    model = optimize_model(str(path), model_type="t5", num_heads=2, hidden_size=16).model
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("", "SimplifiedLayerNormalization") in ops  # ONNX Runtime's, in the default domain
    assert (MS, "SkipSimplifiedLayerNormalization") in ops
    check(model, [_randn(3, 4, 16) * 2])


def test_skip_layer_norm_with_runtime_gamma_after_a_contrib_op() -> None:
    # the hidden size is unknown at import (no shape after Gelu, gamma fed): the explicit formula
    x, skip, gamma = _randn(2, 5, 16), _randn(2, 5, 16), _randn(16)
    nodes = [
        helper.make_node("Gelu", ["x"], ["g"], domain=MS),
        helper.make_node(
            "SkipLayerNormalization", ["g", "skip", "gamma", "beta"], ["y"], domain=MS
        ),
    ]
    inputs = (("x", x), ("skip", skip), ("gamma", gamma))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, FLOAT, a.shape) for n, a in inputs],
        [_output("y")],
        [numpy_helper.from_array(_randn(16), "beta")],
    )
    ids = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    check(helper.make_model(graph, opset_imports=ids, ir_version=10), [x, skip, gamma])

"""ONNX LSTM / GRU / RNN -> nn.LSTM / nn.GRU / nn.RNN, against ONNX Runtime on the original.

Models as users bring them (torch modules with random weights exported by torch.onnx.export:
bidirectional, two layers, batch_first, no bias, relu) and one-node models for what torch's
exporter never writes (direction=reverse, layout=1, initial states, constant sequence_lens and
zero peepholes, weights fed at run time); refusals name the attribute and leave the node opaque.
The tolerance is the exact contract: rtol 1e-5 x max|output| (graphopt.core.numerics).
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphopt import optimize
from graphopt.backends.export import export_onnx
from graphopt.core.numerics import exact_tolerance
from graphopt.errors import CaptureError
from graphopt.frontends.onnx import import_onnx
from graphopt.frontends.onnx.ops.recurrent_loop import recurrent_loop

RNG = np.random.default_rng(0)
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _ort(model: onnx.ModelProto | bytes, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, tuple | list):
        return [t for o in out for t in _outputs(o)]
    return [torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out]


def _assert_exact(got: Sequence[torch.Tensor], ref: Sequence[np.ndarray]) -> None:
    assert len(got) == len(ref)
    for k, (g, r) in enumerate(zip(got, ref, strict=True)):
        r_t = torch.from_numpy(np.asarray(r))
        assert tuple(g.shape) == tuple(r_t.shape), f"output {k}: {g.shape} vs {r_t.shape}"
        err = float((g.detach().double() - r_t.double()).abs().max())
        allowed = exact_tolerance(r_t)
        assert err <= allowed, f"output {k}: max abs error {err:.3g} > {allowed:.3g}"


def _run(gm: torch.fx.GraphModule, feeds: Sequence[np.ndarray]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _outputs(gm(*[torch.from_numpy(x) for x in feeds]))


# -- models exported from torch ---------------------------------------------------------------


class _Net(nn.Module):
    """A recurrent layer stack with a Linear head, as a user's sequence model."""

    def __init__(self, cls: type[nn.Module], **kwargs: object) -> None:
        super().__init__()
        self.rnn = cls(5, 6, **kwargs)
        self.head = nn.Linear(12 if kwargs.get("bidirectional") else 6, 3)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hx = (h, torch.tanh(h)) if isinstance(self.rnn, nn.LSTM) else h
        y, state = self.rnn(x, hx)
        return (self.head(y), *(state if isinstance(state, tuple) else (state,)))


def _export(net: nn.Module, batch_first: bool, dirs: int, layers: int) -> bytes:
    x = torch.randn((2, 4, 5) if batch_first else (4, 2, 5))
    h = torch.randn(dirs * layers, 2, 6)
    buf = io.BytesIO()
    seq, batch = (1, 0) if batch_first else (0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (x, h),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x", "h"],
            # named: the TorchScript exporter refuses to re-export digit names such as '296'
            output_names=["y", "h_n", "c_n"][: 3 if isinstance(net.rnn, nn.LSTM) else 2],
            dynamic_axes={"x": {seq: "S", batch: "B"}, "h": {1: "B"}},
        )
    return buf.getvalue()


CONFIGS = [
    pytest.param({}, id="plain"),
    pytest.param({"bidirectional": True}, id="bidirectional"),
    pytest.param({"num_layers": 2, "bias": False}, id="2layers-nobias"),
    pytest.param({"num_layers": 2, "bidirectional": True, "batch_first": True}, id="2layers-bi-bf"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_torch_exported_model_imports_as_modules_and_matches_ort(
    cls: type[nn.Module], config: dict
) -> None:
    torch.manual_seed(0)
    dirs, layers = 1 + bool(config.get("bidirectional")), int(config.get("num_layers", 1))
    data = _export(_Net(cls, **config), bool(config.get("batch_first")), dirs, layers)
    gm = import_onnx(data)
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    assert sum(type(m) is cls for m in gm.modules()) == layers
    for seq, batch in ((4, 2), (7, 3)):  # both dynamic axes at two sizes
        shape = (batch, seq, 5) if config.get("batch_first") else (seq, batch, 5)
        feeds = [
            RNG.standard_normal(shape).astype(np.float32),
            RNG.standard_normal((dirs * layers, batch, 6)).astype(np.float32),
        ]
        _assert_exact(_run(gm, feeds), _ort(data, feeds))


def test_rnn_relu_becomes_nn_rnn_relu() -> None:
    torch.manual_seed(1)
    data = _export(_Net(nn.RNN, nonlinearity="relu", bidirectional=True), False, 2, 1)
    gm = import_onnx(data)
    (rnn,) = [m for m in gm.modules() if isinstance(m, nn.RNN)]
    assert rnn.nonlinearity == "relu"
    feeds = [RNG.standard_normal((5, 3, 5)).astype(np.float32)]
    feeds.append(RNG.standard_normal((2, 3, 6)).astype(np.float32))
    _assert_exact(_run(gm, feeds), _ort(data, feeds))


def test_optimize_keeps_lstm_and_matches_ort() -> None:
    torch.manual_seed(2)
    data = _export(_Net(nn.LSTM, num_layers=2, bidirectional=True), False, 2, 2)
    feeds = [
        RNG.standard_normal((4, 2, 5)).astype(np.float32),
        RNG.standard_normal((4, 2, 6)).astype(np.float32),
    ]
    result = optimize(onnx.load_from_string(data), example_inputs=feeds, measure=False)
    proto = result.artifact.proto
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 2
    _assert_exact(_outputs(_ort(proto, feeds)), _ort(data, feeds))


# -- one-node models ---------------------------------------------------------------------------


def _weights(op: str, dirs: int, size: int, hidden: int, bias: bool) -> dict[str, np.ndarray]:
    g = GATES[op]
    out = {
        "W": RNG.standard_normal((dirs, g * hidden, size)).astype(np.float32) * 0.5,
        "R": RNG.standard_normal((dirs, g * hidden, hidden)).astype(np.float32) * 0.5,
    }
    if bias:
        out["B"] = RNG.standard_normal((dirs, 2 * g * hidden)).astype(np.float32) * 0.5
    return out


def _node_model(
    op: str,
    x_shape: list[int | str],
    consts: dict[str, np.ndarray],
    runtime: dict[str, list[int | str]],
    layout: int = 0,
    **attrs: object,
) -> onnx.ModelProto:
    """One recurrent node; inputs in ONNX's order (X, W, R, B, sequence_lens, initial_h,
    initial_c, P), ``consts`` as initializers, ``runtime`` (with X) as graph inputs."""
    order = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    present = {"X", *consts, *runtime}
    last = max(order.index(n) for n in present)
    inputs = [n if n in present else "" for n in order[: last + 1]]
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, inputs, outputs, layout=layout, **attrs)
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    graph_inputs += [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in runtime.items()
    ]
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * (4 - (n != "Y")))
            for n in outputs
        ],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_direction_and_initial_states(op: str, direction: str) -> None:
    dirs, hidden = 1 + (direction == "bidirectional"), 4
    consts = _weights(op, dirs, 3, hidden, bias=True)
    states = {"initial_h": [dirs, "B", hidden]}
    if op == "LSTM":
        states["initial_c"] = [dirs, "B", hidden]
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    model = _node_model(
        op, ["S", "B", 3], consts, states, direction=direction, hidden_size=hidden, **extra
    )
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    for seq, batch in ((5, 2), (3, 1)):
        feeds = [RNG.standard_normal((seq, batch, 3)).astype(np.float32)]
        feeds += [RNG.standard_normal((dirs, batch, hidden)).astype(np.float32) for _ in states]
        _assert_exact(_run(gm, feeds), _ort(model, feeds))
    if op == "LSTM" and direction != "forward":  # the flip and the state axes export dynamic
        result = optimize(model, example_inputs=feeds, measure=False)
        assert op in {n.op_type for n in result.artifact.proto.graph.node}
        for seq, batch in ((5, 2), (3, 1)):
            feeds = [RNG.standard_normal((seq, batch, 3)).astype(np.float32)]
            feeds += [RNG.standard_normal((dirs, batch, hidden)).astype(np.float32) for _ in states]
            _assert_exact(_outputs(_ort(result.artifact.proto, feeds)), _ort(model, feeds))


def test_lstm_with_only_initial_h() -> None:
    consts = _weights("LSTM", 1, 3, 4, bias=False)
    model = _node_model("LSTM", ["S", 2, 3], consts, {"initial_h": [1, 2, 4]}, hidden_size=4)
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque")
    feeds = [RNG.standard_normal((6, 2, 3)).astype(np.float32)]
    feeds.append(RNG.standard_normal((1, 2, 4)).astype(np.float32))
    _assert_exact(_run(gm, feeds), _ort(model, feeds))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_layout_1_equals_layout_0_transposed(op: str) -> None:
    """ONNX Runtime has no batchwise (layout=1) kernels: the reference is the layout-0 node on
    the transposed input, its outputs transposed back."""
    dirs, hidden = 2, 4
    consts = _weights(op, dirs, 3, hidden, bias=True)
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    kw = {"direction": "bidirectional", "hidden_size": hidden, **extra}
    batchwise = _node_model(op, ["B", "S", 3], consts, {"initial_h": ["B", dirs, hidden]}, 1, **kw)
    seqwise = _node_model(op, ["S", "B", 3], consts, {"initial_h": [dirs, "B", hidden]}, 0, **kw)
    gm = import_onnx(batchwise)
    assert not gm.meta.get("onnx_opaque")
    x = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    h = RNG.standard_normal((2, dirs, hidden)).astype(np.float32)
    ref = _ort(seqwise, [x.transpose(1, 0, 2).copy(), h.transpose(1, 0, 2).copy()])
    ref = [ref[0].transpose(2, 0, 1, 3)] + [r.transpose(1, 0, 2) for r in ref[1:]]
    _assert_exact(_run(gm, [x, h]), ref)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_weights_at_run_time_use_the_functional_form(op: str) -> None:
    dirs, hidden = 2, 3
    shapes = {
        "W": [dirs, GATES[op] * hidden, 4],
        "R": [dirs, GATES[op] * hidden, hidden],
        "B": [dirs, 2 * GATES[op] * hidden],
    }
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    model = _node_model(
        op, ["S", "B", 4], {}, shapes, direction="bidirectional", hidden_size=hidden, **extra
    )
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque")
    assert not any(isinstance(m, nn.RNNBase) for m in gm.modules())
    weights = _weights(op, dirs, 4, hidden, bias=True)
    feeds = [RNG.standard_normal((5, 2, 4)).astype(np.float32), *weights.values()]
    _assert_exact(_run(gm, feeds), _ort(model, feeds))
    result = optimize(model, example_inputs=feeds, measure=False)
    assert op in {n.op_type for n in result.artifact.proto.graph.node}
    _assert_exact(_outputs(_ort(result.artifact.proto, feeds)), _ort(model, feeds))


def test_full_constant_sequence_lens_and_zero_peepholes_are_accepted() -> None:
    consts = _weights("LSTM", 1, 3, 4, bias=True)
    consts["sequence_lens"] = np.full(2, 5, dtype=np.int32)
    consts["P"] = np.zeros((1, 12), dtype=np.float32)
    model = _node_model("LSTM", [5, 2, 3], consts, {}, hidden_size=4)
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    assert any(isinstance(m, nn.LSTM) for m in gm.modules())  # the module, not the loop
    feeds = [RNG.standard_normal((5, 2, 3)).astype(np.float32)]
    _assert_exact(_run(gm, feeds), _ort(model, feeds))


def _refusal(op: str, attrs: dict) -> str:
    model = _node_model(
        op, ["S", 2, 3], _weights(op, 1, 3, 4, bias=True), {}, hidden_size=4, **attrs
    )
    gm = import_onnx(model)
    reasons = list(gm.meta.get("onnx_opaque", {}).values())
    assert len(reasons) == 1, reasons
    assert not any(isinstance(m, nn.RNNBase) for m in gm.modules())
    feeds = [RNG.standard_normal((3, 2, 3)).astype(np.float32)]
    _assert_exact(_run(gm, feeds), _ort(model, feeds))  # opaque: run by ONNX Runtime
    return reasons[0]


@pytest.mark.parametrize(
    ("op", "attrs", "named"),
    [
        # the spec's and ONNX Runtime's defaults of Affine's / ScaledTanh's alpha and beta differ
        ("RNN", {"activations": ["Affine"]}, "activation_alpha"),
        (
            "GRU",
            {"activations": ["ScaledTanh", "Tanh"], "activation_alpha": [0.5]},
            "activation_beta",
        ),
    ],
)
def test_refusals_name_the_attribute(op: str, attrs: dict, named: str) -> None:
    reason = _refusal(op, attrs)
    assert f"({op})" in reason and named in reason, reason


@pytest.mark.parametrize(
    ("op", "attrs", "named"),
    [
        ("GRU", {"activations": ["Sigmoid", "Gelu"]}, "gelu"),
        ("LSTM", {"activations": ["Sigmoid", "Tanh"]}, "activations"),  # 2 for 3 gates
    ],
)
def test_invalid_activations_fail_import_naming_them(op: str, attrs: dict, named: str) -> None:
    """Neither graphopt nor ONNX Runtime runs the node: a CaptureError, not an opaque node."""
    model = _node_model(op, ["S", 2, 3], _weights(op, 1, 3, 4, True), {}, hidden_size=4, **attrs)
    with pytest.raises(CaptureError, match=named):
        import_onnx(model)


# -- ONNX's equations step by step (recurrent_loop) -----------------------------------------


def _uses_loop(gm: torch.fx.GraphModule) -> bool:
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    assert not any(isinstance(m, nn.RNNBase) for m in gm.modules())
    return any(n.target is recurrent_loop for n in gm.graph.nodes)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_gru_linear_before_reset_0_runs_the_equations_and_exports_as_gru(direction: str) -> None:
    dirs, hidden = 1 + (direction == "bidirectional"), 4
    consts = _weights("GRU", dirs, 3, hidden, bias=True)
    states = {"initial_h": [dirs, "B", hidden]}
    model = _node_model(
        "GRU", ["S", "B", 3], consts, states, direction=direction, hidden_size=hidden
    )
    gm = import_onnx(model)
    assert _uses_loop(gm)
    sizes = ((5, 2), (2, 3))
    feeds_at = [
        [
            RNG.standard_normal((seq, batch, 3)).astype(np.float32),
            RNG.standard_normal((dirs, batch, hidden)).astype(np.float32),
        ]
        for seq, batch in sizes
    ]
    for feeds in feeds_at:
        _assert_exact(_run(gm, feeds), _ort(model, feeds))
    if direction == "bidirectional":  # the artifact: one GRU node, sequence length dynamic
        result = optimize(model, example_inputs=feeds_at[0], measure=False)
        gru = [n for n in result.artifact.proto.graph.node if n.op_type == "GRU"]
        assert len(gru) == 1
        for feeds in feeds_at:
            _assert_exact(_outputs(_ort(result.artifact.proto, feeds)), _ort(model, feeds))


def test_lstm_peepholes_and_sequence_lens() -> None:
    """Non-zero peepholes and per-entry lengths (constant, then fed at run time)."""
    consts = _weights("LSTM", 2, 3, 4, bias=True)
    consts["P"] = RNG.standard_normal((2, 12)).astype(np.float32)
    lens = np.array([4, 1, 3], np.int32)
    kw = {"direction": "bidirectional", "hidden_size": 4}
    with_const = _node_model("LSTM", [4, 3, 3], {**consts, "sequence_lens": lens}, {}, **kw)
    x = RNG.standard_normal((4, 3, 3)).astype(np.float32)
    gm = import_onnx(with_const)
    assert _uses_loop(gm)
    _assert_exact(_run(gm, [x]), _ort(with_const, [x]))
    at_run_time = _node_model("LSTM", ["S", 3, 3], consts, {"sequence_lens": [3]}, **kw)
    at_run_time.graph.input[1].type.tensor_type.elem_type = TensorProto.INT32
    gm = import_onnx(at_run_time)
    assert _uses_loop(gm)
    _assert_exact(_run(gm, [x, lens]), _ort(at_run_time, [x, lens]))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_loop_layout_1_exports_as_layout_0_between_transposes(op: str) -> None:
    """ONNX Runtime runs no layout=1 node: the export writes layout 0 and transposes."""
    dirs, hidden = 2, 3
    consts = _weights(op, dirs, 3, hidden, bias=True)
    if op == "LSTM":
        consts["P"] = RNG.standard_normal((dirs, 3 * hidden)).astype(np.float32)
    kw = {"direction": "bidirectional", "hidden_size": hidden}
    batchwise = _node_model(op, ["B", "S", 3], consts, {"initial_h": ["B", dirs, hidden]}, 1, **kw)
    seqwise = _node_model(op, ["S", "B", 3], consts, {"initial_h": [dirs, "B", hidden]}, 0, **kw)
    gm = import_onnx(batchwise)
    assert _uses_loop(gm)
    x = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    h = RNG.standard_normal((2, dirs, hidden)).astype(np.float32)
    ref = _ort(seqwise, [x.transpose(1, 0, 2).copy(), h.transpose(1, 0, 2).copy()])
    ref = [ref[0].transpose(2, 0, 1, 3)] + [r.transpose(1, 0, 2) for r in ref[1:]]
    _assert_exact(_run(gm, [x, h]), ref)
    axes = {"X": {0: "B", 1: "S"}, "initial_h": {0: "B"}}
    proto = export_onnx(
        gm,
        [torch.from_numpy(x), torch.from_numpy(h)],
        input_names=["X", "initial_h"],
        dynamic_axes=axes,
    )
    (node,) = [n for n in proto.graph.node if n.op_type == op]
    assert all(a.name != "layout" or a.i == 0 for a in node.attribute)
    _assert_exact(_outputs(_ort(proto, [x, h])), ref)


LOOP_CASES = [
    ("LSTM", {"activations": ["HardSigmoid", "Tanh", "Softsign"], "activation_alpha": [0.3]}),
    ("LSTM", {"activations": ["Sigmoid", "LeakyRelu", "Elu"], "activation_alpha": [0.2, 0.7]}),
    ("LSTM", {"clip": 0.5}),
    ("LSTM", {"input_forget": 1}),
    ("GRU", {"activations": ["Sigmoid", "Relu"], "linear_before_reset": 1}),
    ("GRU", {"clip": 0.2}),
    (
        "GRU",
        {
            "activations": ["ScaledTanh", "Affine"],
            "activation_alpha": [0.5, 2.0],
            "activation_beta": [1.5, 0.1],
        },
    ),
    ("RNN", {"activations": ["ThresholdedRelu"], "activation_alpha": [0.1]}),
    ("RNN", {"activations": ["Sigmoid"], "clip": 1.0}),
    ("RNN", {"activations": ["Tanh", "Relu"], "direction": "bidirectional"}),
]


@pytest.mark.parametrize(
    ("op", "attrs"),
    LOOP_CASES,
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}" for k in v),
)
def test_activations_clip_input_forget_match_ort(op: str, attrs: dict) -> None:
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    consts = _weights(op, dirs, 3, 4, bias=True)
    if op == "LSTM":
        consts["P"] = RNG.standard_normal((dirs, 12)).astype(np.float32)
    model = _node_model(op, ["S", 2, 3], consts, {}, hidden_size=4, **attrs)
    gm = import_onnx(model)
    assert _uses_loop(gm)
    x = RNG.standard_normal((5, 2, 3)).astype(np.float32) * 2  # past the clip bounds
    _assert_exact(_run(gm, [x]), _ort(model, [x]))


def test_loop_optimizes_to_the_node_with_its_attributes() -> None:
    """LSTM with clip (ONNX Runtime clips the gates' inputs, not h(c')), other activations per
    direction and peepholes: optimize() writes the node back, exact at two lengths."""
    acts = ["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Softplus", "Relu"]
    consts = _weights("LSTM", 2, 3, 4, bias=True)
    consts["P"] = RNG.standard_normal((2, 12)).astype(np.float32)
    attrs = {"clip": 0.3, "direction": "bidirectional", "activations": acts}
    model = _node_model("LSTM", ["S", 2, 3], consts, {}, hidden_size=4, **attrs)
    x = RNG.standard_normal((5, 2, 3)).astype(np.float32) * 2
    result = optimize(model, example_inputs=[x], measure=False)
    (node,) = [n for n in result.artifact.proto.graph.node if n.op_type == "LSTM"]
    written = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert written["clip"] == pytest.approx(0.3) and len(written["activations"]) == 6
    for seq in (5, 9):
        x = RNG.standard_normal((seq, 2, 3)).astype(np.float32) * 2
        _assert_exact(_outputs(_ort(result.artifact.proto, [x])), _ort(model, [x]))


@settings(max_examples=30, deadline=None)
@given(
    op=st.sampled_from(["LSTM", "GRU", "RNN"]),
    direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    layout=st.integers(0, 1),
    bias=st.booleans(),
    with_h=st.booleans(),
    seq=st.integers(1, 4),
    batch=st.integers(1, 3),
)
def test_modules_equal_the_equations(
    op: str, direction: str, layout: int, bias: bool, with_h: bool, seq: int, batch: int
) -> None:
    """The module form (nn.LSTM/GRU/RNN, regated weights, flips, transposes) equals ONNX's
    equations run step by step (recurrent_loop) on random nodes, layout 1 included."""
    dirs, hidden, size = 1 + (direction == "bidirectional"), 3, 2
    rng = np.random.default_rng(seq * 100 + batch)
    w = {k: torch.from_numpy(v) for k, v in _weights(op, dirs, size, hidden, bias).items()}
    x = torch.from_numpy(rng.standard_normal((seq, batch, size)).astype(np.float32))
    h = torch.from_numpy(rng.standard_normal((dirs, batch, hidden)).astype(np.float32))
    if layout:
        x, h = x.transpose(0, 1).contiguous(), h.transpose(0, 1).contiguous()
    x_shape = ["B", "S", size] if layout else ["S", "B", size]
    h_shape = ["B", dirs, hidden] if layout else [dirs, "B", hidden]
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    attrs = {"direction": direction, "hidden_size": hidden, "layout": layout, **extra}
    runtime = {"initial_h": h_shape} if with_h else {}
    model = _node_model(op, x_shape, {k: v.numpy() for k, v in w.items()}, runtime, **attrs)
    gm = import_onnx(model)
    assert any(isinstance(m, nn.RNNBase) for m in gm.modules())
    got = _outputs(gm(x, h) if with_h else gm(x))
    inputs = [x, w["W"], w["R"], w.get("B"), None, h if with_h else None]
    expected = recurrent_loop(op, tuple(attrs.items()), *inputs)
    _assert_exact(got, [e.numpy() for e in expected])


@pytest.mark.parametrize(
    ("op", "attrs", "weights_at_run_time"),
    [("GRU", {}, False), ("LSTM", {"clip": 1.0}, False), ("LSTM", {}, True)],
)
def test_pickled_graph_keeps_its_helpers(op: str, attrs: dict, weights_at_run_time: bool) -> None:
    """Unpickling a GraphModule re-traces its code: the loop and the functional form stay one
    call each (traced into, they fail on the tracer's proxies)."""
    w = _weights(op, 1, 3, 4, True)
    runtime = {k: list(v.shape) for k, v in w.items()} if weights_at_run_time else {}
    model = _node_model(op, ["S", 2, 3], {} if runtime else w, runtime, hidden_size=4, **attrs)
    gm = import_onnx(model)
    feeds = [RNG.standard_normal((3, 2, 3)).astype(np.float32)]
    feeds += list(w.values()) if weights_at_run_time else []
    again = pickle.loads(pickle.dumps(gm))
    for got, ref in zip(_run(again, feeds), _run(gm, feeds), strict=True):
        assert torch.equal(got, ref)

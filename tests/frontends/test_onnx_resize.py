"""ONNX Resize / Upsample / GridSample converters (graphopt/frontends/onnx/ops/resize.py): ONNX's
own node tests with constant scales/sizes (as exported models carry them), the nearest index
arithmetic against ONNX Runtime bit for bit, the interpolation matrices against ONNX's reference,
an FPN exported from torch with runtime sizes at two input sizes, and the optimize() path."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.backend.test.case.node import collect_testcases
from onnx.reference import ReferenceEvaluator
from torch import nn

from graphopt import optimize
from graphopt.core.numerics import exact_tolerance
from graphopt.frontends.onnx import import_onnx

RNG = np.random.default_rng(0)
# ONNX's reference takes the output width as scale * in for these, ONNX Runtime the integer size:
# with a fractional scale * in the node stays opaque (ONNX Runtime's answer, not the reference's)
ORT_DIFFERS = {
    "test_resize_downsample_scales_linear_align_corners",
    "test_resize_downsample_scales_cubic_align_corners",
}


def _ort(model: onnx.ModelProto | bytes, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _assert_exact(got: object, ref: np.ndarray) -> None:
    got_t = torch.as_tensor(np.asarray(got)).double()
    ref_t = torch.as_tensor(np.asarray(ref)).double()
    assert got_t.shape == ref_t.shape
    err = float((got_t - ref_t).abs().max()) if ref_t.numel() else 0.0
    allowed = exact_tolerance(torch.as_tensor(np.asarray(ref)))
    assert err <= allowed, f"max abs error {err:.3g} > {allowed:.3g}"


def _with_constant_inputs(case) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The case's model with every input but X an initializer; X and the expected output."""
    inputs, outputs = case.data_sets[0]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    g = model.graph
    for vi, value in zip(list(g.input)[1:], inputs[1:], strict=True):
        g.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
    del g.input[1:]
    return model, np.asarray(inputs[0]), np.asarray(outputs[0])


def _cases(*ops: str) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = collect_testcases(None)
    return [
        c for c in found if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type in ops
    ]


RESIZE_CASES = _cases("Resize", "Upsample")


@pytest.mark.parametrize("case", RESIZE_CASES, ids=lambda c: c.name)
def test_node_test_with_constant_scales_converts_and_matches(case) -> None:
    model, x, expected = _with_constant_inputs(case)
    gm = import_onnx(model)
    with torch.no_grad():
        got = gm(torch.from_numpy(x)).numpy()
    if case.name in ORT_DIFFERS:
        assert "no integer" in next(iter(gm.meta["onnx_opaque"].values()))
        np.testing.assert_array_equal(got, _ort(model, [x])[0])
        return
    if "_not_" in case.name:  # keep_aspect_ratio_policy with round_prefer_floor: opaque
        assert "round_prefer_floor" in next(iter(gm.meta["onnx_opaque"].values()))
        np.testing.assert_array_equal(got, expected)
        return
    assert not gm.meta["onnx_opaque"], gm.meta["onnx_opaque"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _resize_model(
    shape: Sequence[int], *, sizes=None, scales=None, opset: int = 19, **attrs
) -> onnx.ModelProto:
    """Resize of input x, one node and one output per entry of ``sizes`` (or ``scales``)."""
    many = sizes if sizes is not None else scales
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    nodes, outputs = [], []
    for k, target in enumerate(many if isinstance(many[0], list | tuple) else [many]):
        if scales is not None:
            inits.append(numpy_helper.from_array(np.asarray(target, np.float32), f"s{k}"))
            names = ["x", "roi", f"s{k}"]
        else:
            inits.append(numpy_helper.from_array(np.asarray(target, np.int64), f"s{k}"))
            names = ["x", "roi", "", f"s{k}"]
        nodes.append(helper.make_node("Resize", names, [f"y{k}"], **attrs))
        outputs.append(
            helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [None] * len(shape))
        )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


TRANSFORMS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
TRANSFORMS += ["tf_half_pixel_for_nn", "half_pixel_symmetric"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    "nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
)
def test_nearest_indices_are_onnx_runtimes_bit_for_bit(transform: str, nearest_mode: str) -> None:
    """A runtime input length 1..16 (the indices computed in the graph) to every output length
    1..32, and static lengths with scales (the indices computed at import): the picked pixels
    are ONNX Runtime's own (exact equality)."""
    attrs = dict(
        mode="nearest", coordinate_transformation_mode=transform, nearest_mode=nearest_mode
    )
    sizes = [[1, 1, n_out] for n_out in range(1, 33)]
    model = _resize_model((1, 1, "n"), sizes=sizes, **attrs)
    gm = import_onnx(model)
    if gm.meta["onnx_opaque"]:  # ties ONNX Runtime rounds in its own way: refused
        assert nearest_mode.startswith("round") or transform == "half_pixel_symmetric"
        assert "run time is not supported" in next(iter(gm.meta["onnx_opaque"].values()))
    else:
        assert "resize_nearest_axis" in gm.code
        for n_in in range(1, 17):
            x = np.arange(n_in, dtype=np.float32).reshape(1, 1, n_in) + 1
            _assert_same_as_ort(model, x, gm)
    # with a fractional scale * in these stay opaque (see ORT_DIFFERS)
    if transform not in ("align_corners", "pytorch_half_pixel"):
        scales = [[1, 1, s] for s in (0.5, 0.75, 1.5, 2.0, 3.0, 2.5, 0.3)]
        x = np.arange(9, dtype=np.float32).reshape(1, 1, 9) + 1
        _assert_same_as_ort(_resize_model((1, 1, 9), scales=scales, **attrs), x)


_SESSIONS: dict[bytes, ort.InferenceSession] = {}


def _assert_same_as_ort(model: onnx.ModelProto, x: np.ndarray, gm=None) -> None:
    gm = gm or import_onnx(model)
    assert not gm.meta["onnx_opaque"], gm.meta["onnx_opaque"]
    with torch.no_grad():
        got = gm(torch.from_numpy(x))
    key = model.SerializeToString()  # (an id() could be reused by a later model)
    sess = _SESSIONS.get(key) or _SESSIONS.setdefault(key, ort.InferenceSession(key))
    for k, (g, r) in enumerate(zip(got, sess.run(None, {"x": x}), strict=True)):
        np.testing.assert_array_equal(g.numpy(), r, f"{x.shape[-1]} -> output {k}")


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("transform", [*TRANSFORMS, "tf_crop_and_resize"])
@pytest.mark.parametrize("antialias", [0, 1])
def test_linear_and_cubic_match_onnx_reference(mode: str, transform: str, antialias: int) -> None:
    x = RNG.standard_normal((1, 2, 5, 7)).astype(np.float32)
    attrs = dict(mode=mode, coordinate_transformation_mode=transform, antialias=antialias)
    if transform == "tf_crop_and_resize":
        attrs["extrapolation_value"] = 2.5
    model = _resize_model(
        x.shape, sizes=[[1, 2, *o] for o in ((3, 4), (9, 13), (5, 7), (1, 2))], **attrs
    )
    if transform == "tf_crop_and_resize":
        roi = np.array([0, 0, 0.1, -0.2, 1, 1, 0.8, 1.3], np.float32)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(roi, "roi"))
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"], gm.meta["onnx_opaque"]
    with torch.no_grad():
        got = gm(torch.from_numpy(x))
    # ONNX's reference has no tf_half_pixel_for_nn outside nearest: ONNX Runtime is the judge
    if transform == "tf_half_pixel_for_nn":
        refs = _ort(model, [x])
    else:
        refs = ReferenceEvaluator(model).run(None, {"x": x})
    for g, r in zip(got, refs, strict=True):
        _assert_exact(g, r)


class _FPN(nn.Module):
    """Two levels, the coarse one upsampled to the fine one's size (sizes from Shape at run
    time), as PP-OCR's detector and torchvision's FPN do."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.fine = nn.Conv2d(3, 4, 3, padding=1)
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.fine(x), self.coarse(x)
        kw = {} if self.mode == "nearest" else {"align_corners": False}
        up = F.interpolate(coarse, size=fine.shape[2:], mode=self.mode, **kw)
        half = F.interpolate(fine, scale_factor=0.5, mode="nearest")
        return fine + up, torch.relu(half)


def _export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (x,),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["out", "half"],
            dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}},
        )
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_fpn_with_runtime_sizes_at_two_input_sizes(mode: str) -> None:
    model = _export(_FPN(mode), torch.randn(1, 3, 16, 24))
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"]
    result = optimize(
        model,
        example_inputs=[RNG.standard_normal((1, 3, 16, 24)).astype(np.float32)],
        measure=False,
    )
    for shape in ((1, 3, 16, 24), (2, 3, 22, 10)):
        x = RNG.standard_normal(shape).astype(np.float32)
        refs = _ort(model, [x])
        with torch.no_grad():
            got = gm(torch.from_numpy(x))
        artifact = _ort(result.artifact.proto, [x])
        for g, a, r in zip(got, artifact, refs, strict=True):
            _assert_exact(g, r)
            _assert_exact(a, r)


def test_runtime_scales_stay_opaque_and_run() -> None:
    model = _resize_model((1, 1, 4, 4), scales=[1, 1, 2, 2], mode="linear")
    scales = model.graph.initializer.pop()
    model.graph.input.append(helper.make_tensor_value_info("s0", TensorProto.FLOAT, [4]))
    gm = import_onnx(model)
    [reason] = gm.meta["onnx_opaque"].values()
    assert "'scales'" in reason and "run time" in reason
    x = RNG.standard_normal((1, 1, 4, 4)).astype(np.float32)
    s = numpy_helper.to_array(scales)
    _assert_exact(gm(torch.from_numpy(x), torch.from_numpy(s)), _ort(model, [x, s])[0])


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in RESIZE_CASES
        if c.name
        in (
            "test_resize_upsample_scales_cubic_A_n0p5_exclude_outside",
            "test_resize_tf_crop_and_resize_axes_3_2",
            "test_resize_upsample_sizes_nearest_ceil_half_pixel",
            "test_resize_downsample_sizes_linear_antialias",
        )
    ],
    ids=lambda c: c.name,
)
def test_optimize_reexports_the_index_and_matrix_paths(case) -> None:
    model, x, expected = _with_constant_inputs(case)
    result = optimize(model, example_inputs=[x], measure=False)
    np.testing.assert_allclose(np.asarray(result(x)), expected, rtol=1e-5, atol=1e-6)


GRID_CASES = _cases("GridSample")


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: c.name)
def test_grid_sample_node_tests(case) -> None:
    inputs, outputs = case.data_sets[0]
    gm = import_onnx(case.model)
    got = gm(*[torch.from_numpy(np.asarray(i)) for i in inputs]).numpy()
    if "volumetric" in case.name:  # torch's exporter writes no 5-D grid_sample
        assert "5-D input" in next(iter(gm.meta["onnx_opaque"].values()))
    else:
        assert not gm.meta["onnx_opaque"]
    np.testing.assert_allclose(got, outputs[0], rtol=1e-3, atol=1e-6)


def test_grid_sample_from_torch_through_optimize() -> None:
    class Warp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            grid = torch.tanh(self.flow(x)).permute(0, 2, 3, 1) * 1.2
            return F.grid_sample(
                x, grid, mode="bicubic", padding_mode="reflection", align_corners=True
            )

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Warp().eval(),
            (torch.randn(1, 3, 8, 8),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
        )
    model = onnx.load_from_string(buffer.getvalue())
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = _ort(model, [x])[0]
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"]
    _assert_exact(gm(torch.from_numpy(x)).detach(), ref)
    result = optimize(model, example_inputs=[x], measure=False)
    _assert_exact(_ort(result.artifact.proto, [x])[0], ref)


class _Recomputed(nn.Module):
    """recompute_scale_factor=True: torch exports the sizes as Floor(Cast(Shape(x)) * scale),
    a tensor computed at run time (not a shape value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, scale_factor=(2.0, 1.5), mode="nearest", recompute_scale_factor=True
        )


def test_sizes_computed_by_tensor_ops_at_two_input_sizes() -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Recomputed(),
            (torch.randn(1, 2, 4, 6),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"]
    example = RNG.standard_normal((1, 2, 4, 6)).astype(np.float32)
    result = optimize(model, example_inputs=[example], measure=False)
    for shape in ((1, 2, 4, 6), (2, 2, 7, 5)):
        x = RNG.standard_normal(shape).astype(np.float32)
        ref = _ort(model, [x])[0]
        np.testing.assert_array_equal(gm(torch.from_numpy(x)).numpy(), ref)
        np.testing.assert_array_equal(_ort(result.artifact.proto, [x])[0], ref)


@pytest.mark.parametrize(
    ("op", "opset", "mode", "scales"),
    [
        ("Upsample", 7, "nearest", [1, 1, 2, 3]),
        ("Upsample", 7, "linear", [1, 1, 2, 1.5]),
        ("Upsample", 9, "nearest", [1, 1, 3, 2]),
        ("Resize", 10, "nearest", [1, 1, 2, 2]),
        ("Resize", 10, "linear", [1, 1, 1.5, 2.5]),
    ],
)
def test_legacy_upsample_and_resize10(op: str, opset: int, mode: str, scales: list) -> None:
    """Before opset 11: asymmetric coordinates (linear by the matrices, nearest by indices or
    F.interpolate), scales as an attribute (Upsample-7) or an input."""
    x = RNG.standard_normal((1, 2, 3, 4)).astype(np.float32)
    inits, names, attrs = [], ["x"], {"mode": mode}
    if opset == 7:
        attrs["scales"] = [float(s) for s in scales]
    else:
        inits.append(numpy_helper.from_array(np.asarray(scales, np.float32), "scales"))
        names.append("scales")
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"], gm.meta["onnx_opaque"]
    _assert_exact(gm(torch.from_numpy(x)), _ort(model, [x])[0])


def test_output_size_is_onnx_runtimes_not_shape_inferences() -> None:
    """Scale 0.7 of 10: ONNX Runtime makes 7 (float32 product), ONNX shape inference says 6;
    the graph computes 7 and a reshape after it reads the corrected size."""
    model = _resize_model((1, 1, 10, 10), scales=[1, 1, 0.7, 0.7], mode="linear")
    model.graph.node.append(helper.make_node("Flatten", ["y0"], ["flat"], axis=2))
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [None] * 2))
    x = RNG.standard_normal((1, 1, 10, 10)).astype(np.float32)
    gm = import_onnx(model)
    assert not gm.meta["onnx_opaque"]
    for got, ref in zip(gm(torch.from_numpy(x)), _ort(model, [x]), strict=True):
        assert got.shape == ref.shape == ((1, 1, 7, 7) if got.dim() == 4 else (1, 49))
        _assert_exact(got, ref)

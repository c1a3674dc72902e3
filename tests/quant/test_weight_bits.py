"""7-bit weights: int8 values in [-63, 63], for x86 CPUs without VNNI, whose int8 kernels add
each pair of uint8 x int8 products in saturating int16 (graphopt.target.int8_pairs_saturate).

With them no pair can saturate, so ONNX Runtime's fast uint8 x int8 kernels compute what its
exact ones (``session.x64quantprecision``) do; bias correction measures the same rounding
insert-qdq does; ``auto`` picks 7 bits on this machine's CPU only where it has no VNNI.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from graphopt.backends.export import export_onnx
from graphopt.backends.onnxruntime import EXACT_INT8_CONFIG
from graphopt.errors import InputError
from graphopt.quant.annotations import mark_weight_bits
from graphopt.quant.improve import quantize_int8
from graphopt.quant.onnx_passes import bias_correction
from graphopt.quant.qdq import quantize_onnx
from graphopt.quant.qparams import weight_qparams
from graphopt.target import Target, int8_pairs_saturate


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    proto = export_onnx(model, (torch.randn(1, 3, 16, 16),))
    # large inputs: uint8 activations near 255 meet the largest weights
    calib = [(3 * torch.randn(8, 3, 16, 16, generator=gen),) for _ in range(4)]
    held_out = 3 * torch.randn(16, 3, 16, 16, generator=gen).numpy()
    return proto, calib, held_out


def _int8_weights(model) -> list[np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    return [
        numpy_helper.to_array(inits[n.input[0]])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
        and inits[n.input[0]].data_type == TensorProto.INT8
    ]  # fmt: skip


def _run(model, x: np.ndarray, exact: bool) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if exact:
        opts.add_session_config_entry(*EXACT_INT8_CONFIG)
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {model.graph.input[0].name: x})[0]


def test_7_bit_weight_parameters_span_minus_63_to_63():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    qp = weight_qparams(w, bits=7)
    q = qp.quantize(w)
    assert (qp.qmin, qp.qmax) == (-63, 63)
    assert int(q.abs().amax(1).min()) == 63  # every channel's largest weight reaches 63
    assert torch.allclose(qp.scale, w.abs().amax(1) / 63)
    with pytest.raises(InputError, match="8 or 7 bits"):
        weight_qparams(w, bits=4)


def test_7_bit_weights_make_the_fast_int8_kernels_compute_the_exact_ones(small):
    proto, calib, held_out = small
    qmodel, report = quantize_onnx(proto, calib, method="minmax", weight_bits=7)
    assert report.weight_bits == 7 and "7-bit weights" in str(report).splitlines()[0]
    weights = _int8_weights(qmodel)
    assert len(weights) == 3  # both convs and the classifier
    assert all(w.min() >= -63 and w.max() <= 63 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) == 63
    np.testing.assert_array_equal(_run(qmodel, held_out, False), _run(qmodel, held_out, True))
    eight, _ = quantize_onnx(proto, calib, method="minmax")
    assert max(int(np.abs(w).max()) for w in _int8_weights(eight)) == 127


def test_bias_correction_measures_the_rounding_of_the_marked_bits(small):
    proto, calib, _ = small
    _, _, shifts8 = bias_correction(proto, calib, refine=0)
    marked = onnx.ModelProto()
    marked.CopyFrom(proto)
    mark_weight_bits(marked, 7, "test")
    _, _, shifts7 = bias_correction(marked, calib, refine=0)
    assert shifts8.keys() == shifts7.keys() and shifts8
    # coarser rounding, larger shifts: 7 bits double the step of 8
    mean8 = np.mean([np.abs(s).mean() for s in shifts8.values()])
    mean7 = np.mean([np.abs(s).mean() for s in shifts7.values()])
    assert mean7 > 1.3 * mean8, (mean7, mean8)


def test_the_int8_stage_quantises_to_the_asked_bits_and_says_why(small):
    proto, calib, held_out = small
    qmodel, report = quantize_int8(
        proto, calib, method="minmax", weight_bits=7, weight_bits_reason="no VNNI here"
    )
    assert all(w.min() >= -63 and w.max() <= 63 for w in _int8_weights(qmodel))
    assert "graphopt.quant.weight_bits" not in {p.key for p in qmodel.metadata_props}
    assert report.to_dict()["weight_bits"] == 7
    assert report.to_dict()["weight_bits_reason"] == "no VNNI here"
    assert "7-bit weights" in report.summary()
    with pytest.raises(InputError, match="8 or 7 bits"):
        quantize_int8(proto, calib, weight_bits=6)


@pytest.mark.parametrize(
    ("machine", "flags", "target", "seven"),
    [
        ("x86_64", {"avx2", "fma"}, "cpu", True),
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "cpu", False),
        ("x86_64", {"avx2", "avx_vnni"}, "cpu", False),
        ("x86_64", {"avx2"}, "llvm -mcpu=cascadelake", False),  # another CPU, named
        ("x86_64", {"avx2"}, "cuda", False),
        ("aarch64", {"asimd"}, "cpu", False),
        ("x86_64", set(), "cpu", False),  # flags unknown (no /proc/cpuinfo): keep 8 bits
    ],
)
def test_auto_picks_7_bits_only_for_this_x86_cpu_without_vnni(
    monkeypatch, machine, flags, target, seven
):
    monkeypatch.setattr("graphopt.target.platform.machine", lambda: machine)
    monkeypatch.setattr("graphopt.target.host_cpu_info", lambda: ("cpu", frozenset(flags)))
    assert bool(int8_pairs_saturate(Target.parse(target))) == seven

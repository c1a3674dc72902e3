"""The int8 stage as passes under the pass manager: smooth-quant, correct-bias, fallback-to-float
and insert-qdq over an ``onnx.ModelProto`` (``PassManager(..., ir=ONNX)``).

Each pass keeps its contract on the sample inputs; a broken contract is rolled back; the stage
gives the same model as the passes' functions; the annotations the passes leave for each
other round-trip exactly and never reach the artifact.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from graphopt.backends.export import export_onnx
from graphopt.core.pass_infra import PassContext
from graphopt.core.registry import registered_passes
from graphopt.errors import VerificationError
from graphopt.pipeline import PassManager
from graphopt.quant.annotations import (
    float_marks,
    mark_float,
    original_biases,
    restore_biases,
    strip,
)
from graphopt.quant.improve import quantize_int8
from graphopt.quant.onnx_ir import ONNX
from graphopt.quant.onnx_passes import (
    CorrectBias,
    FallbackToFloat,
    InsertQDQ,
    SmoothQuant,
    int8_passes,
)
from graphopt.quant.qdq import quantize_onnx
from graphopt.quant.runtime import predictor
from graphopt.testing import random_cnn, seeded

STAGE = ["smooth-quant", "correct-bias", "fallback-to-float", "insert-qdq"]


def _init(model: nn.Module, seed: int) -> nn.Module:
    gen = seeded(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


class LnMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.ln(x)))


class ConvNet(nn.Module):
    """conv1 has no bias (correct-bias adds one), conv2 has one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


class OutlierHead(nn.Module):
    """fc2's input has one channel 400x the rest: all-int8 loses the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)
        scale = torch.ones(32)
        scale[0] = 400.0
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.scale)


@pytest.fixture(scope="module")
def ln_mlp():
    model = _init(LnMlp(), 0)
    with torch.no_grad():
        model.ln.weight[:3] = 30.0  # outlier channels for SmoothQuant
    gen = seeded(1)
    proto = export_onnx(model, (torch.randn(4, 10, 16, generator=gen),))
    calib = [(torch.randn(4, 10, 16, generator=gen).numpy(),) for _ in range(4)]
    return proto, calib, (torch.randn(4, 10, 16, generator=gen),)


@pytest.fixture(scope="module")
def conv_net():
    model = _init(ConvNet(), 3)
    gen = seeded(4)
    calib = [((torch.rand(4, 3, 8, 8, generator=gen) + 0.5).numpy(),) for _ in range(4)]
    proto = export_onnx(model, (torch.from_numpy(calib[0][0][:1]),))
    return proto, calib


@pytest.fixture(scope="module")
def outlier_head():
    model = _init(OutlierHead(), 5)
    with torch.no_grad():
        model.fc2.weight[:, 0] *= 1e-3
        model.fc2.bias.zero_()
    gen = seeded(6)
    calib = [(torch.randn(32, 16, generator=gen).numpy(),) for _ in range(4)]
    proto = export_onnx(model, (torch.from_numpy(calib[0][0][:1]),))
    return proto, calib


def test_the_stage_passes_are_registered_as_onnx_passes():
    passes = registered_passes()
    for name in STAGE:
        assert passes[name].ir == "onnx" and passes[name].__doc__, name
        assert passes[name].__module__.endswith(name.replace("-", "_"))
    assert getattr(passes["fold-conv-bn"], "ir", "fx") == "fx"


def test_int8_passes_expands_insert_qdq_options():
    names = [str(p) for p in int8_passes(InsertQDQ.Options(method="minmax", max_drop=0.02))]
    assert names == [
        "smooth-quant",
        "correct-bias",
        "fallback-to-float{max_drop=0.02,method=minmax}",
        "insert-qdq{method=minmax,max_drop=0.02}",
    ]
    bare = int8_passes(InsertQDQ.Options(smoothquant=False, bias_correction=False, alpha=0.8))
    assert [p.name for p in bare] == ["insert-qdq"]
    assert [str(p) for p in int8_passes(InsertQDQ.Options(alpha=0.8))][
        0
    ] == "smooth-quant{alpha=0.8}"


def test_quantize_int8_records_each_step_with_its_contract(ln_mlp):
    proto, calib, sample = ln_mlp
    ctx = PassContext(sample_inputs=sample, strict=True)
    qmodel, report = quantize_int8(proto, calib, method="minmax", max_drop=0.05, context=ctx)
    assert [r.name for r in report.records] == STAGE
    for r in report.records:
        assert r.status == "ok" and r.comparison is not None and r.comparison.ok, r
    smooth = report.records[0]
    assert (
        smooth.modified and smooth.stats["smoothed"] == 2 and smooth.comparison.metric == "max_abs"
    )
    assert report.records[-1].stats["int8"] == len(report.int8_layers)
    assert not qmodel.metadata_props  # the annotations never reach the artifact
    # without a context: the same model, every step unverified
    again, plain = quantize_int8(proto, calib, method="minmax", max_drop=0.05)
    assert again.SerializeToString() == qmodel.SerializeToString()
    assert {r.status for r in plain.records} == {"unverified"}


def test_insert_qdq_alone_is_quantize_onnx(conv_net):
    proto, calib = conv_net
    pm = PassManager([InsertQDQ(method="minmax")], ir=ONNX)
    result = pm.run(proto, PassContext(calibration_data=calib))
    expected, report = quantize_onnx(proto, calib, method="minmax")
    assert result.graph.SerializeToString() == expected.SerializeToString()
    record = result.records[0]
    assert record.modified and record.stats == {"int8": 2, "float": 0}
    assert str(record.decisions[0]).startswith("int8: 2 of 2 layers int8 (minmax calibration")
    assert [str(d) for d in record.decisions[1:]] == [str(d) for d in report.layers]


def test_correct_bias_remembers_and_restores_the_original_biases(conv_net):
    proto, calib = conv_net
    pm = PassManager([CorrectBias()], ir=ONNX)
    corrected = pm.run(proto, PassContext(calibration_data=calib)).graph
    conv1, conv2 = (n.name for n in corrected.graph.node if n.op_type == "Conv")
    originals = original_biases(corrected)
    assert originals[conv1] is None and originals[conv2] is not None  # conv1's bias is added
    assert len(next(n for n in corrected.graph.node if n.name == conv1).input) == 3
    restored = restore_biases(corrected, [conv1, conv2])
    assert not original_biases(restored)
    strip(restored)
    assert restored.graph.SerializeToString() == _named(proto).graph.SerializeToString()


def test_insert_qdq_gives_a_float_layer_its_original_bias(conv_net):
    proto, calib = conv_net
    corrected = PassManager([CorrectBias()], ir=ONNX).run(
        proto, PassContext(calibration_data=calib)
    )
    model = corrected.graph
    conv2 = [n.name for n in model.graph.node if n.op_type == "Conv"][1]
    mark_float(model, {conv2: "kept float for the test"})
    result = PassManager([InsertQDQ(method="minmax")], ir=ONNX).run(
        model, PassContext(calibration_data=calib)
    )
    layers = {d.node: d for d in result.records[0].decisions[1:]}
    assert not layers[conv2].quantized and layers[conv2].reason == "kept float for the test"
    bias = next(n for n in result.graph.graph.node if n.name == conv2).input[2]
    inits = {t.name: t for t in result.graph.graph.initializer}
    original = {t.name: t for t in proto.graph.initializer}[bias]
    assert inits[bias].SerializeToString() == original.SerializeToString()


def test_fallback_to_float_only_marks_layers(outlier_head):
    proto, calib = outlier_head
    gemms = [n.name for n in proto.graph.node if n.op_type == "Gemm"]
    pm = PassManager([FallbackToFloat(max_drop=0.02, method="minmax")], ir=ONNX)
    sample = (torch.from_numpy(calib[0][0]),)
    result = pm.run(proto, PassContext(sample_inputs=sample, calibration_data=calib))
    record = result.records[0]
    assert record.status == "ok" and record.modified and record.comparison.measured == 0.0
    assert list(float_marks(result.graph)) == [gemms[1]]
    assert "mixed-precision fallback" in float_marks(result.graph)[gemms[1]]
    summary = record.decisions[0]
    assert summary.fallback == [gemms[1]] and summary.drop <= 0.02 < summary.drop_all


def test_a_broken_int8_contract_is_rolled_back_or_raises(outlier_head):
    proto, calib = outlier_head
    sample = (torch.from_numpy(calib[0][0]),)
    qmodel, report = quantize_int8(
        proto, calib, method="minmax", context=PassContext(sample_inputs=sample)
    )
    last = report.records[-1]
    assert last.name == "insert-qdq" and last.status == "rolled-back"
    assert last.comparison.metric == "cosine" and not last.comparison.ok
    assert report.drop_all > 0.2  # measured before the rollback, still reported
    assert "QuantizeLinear" not in {n.op_type for n in qmodel.graph.node}  # the float model
    assert not qmodel.metadata_props
    # the stage's float model: bias-corrected, so close to the model but not equal
    y, ref = predictor(qmodel)(calib[1][0]), predictor(proto)(calib[1][0])
    assert float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref))) > 0.99
    with pytest.raises(VerificationError, match="insert-qdq.*broke its numeric contract"):
        quantize_int8(
            proto, calib, method="minmax", context=PassContext(sample_inputs=sample, strict=True)
        )


def test_smooth_quant_pass_is_exact_and_refusals_are_counted(ln_mlp):
    proto, calib, sample = ln_mlp
    pm = PassManager([SmoothQuant(alpha=0.5)], ir=ONNX, strict=True)
    result = pm.run(proto, PassContext(sample_inputs=sample, calibration_data=calib))
    record = result.records[0]
    assert record.stats == {"smoothed": 2} and record.comparison.ok
    x = calib[0][0]
    y = predictor(proto)(x)
    bound = 1e-4 * float(np.abs(y).max())
    assert float(np.abs(predictor(result.graph)(x) - y).max()) <= bound


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate(out.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    return out


_ONNX_PASSES = sorted(
    n
    for n, c in registered_passes().items()
    if c.__module__.startswith("graphopt.") and getattr(c, "ir", "fx") == "onnx"
)


@pytest.mark.parametrize("name", _ONNX_PASSES)
def test_every_onnx_stage_pass_keeps_its_contract_on_random_cnns(name):
    """Each ONNX-stage pass with its default options, on random CNNs exported to ONNX, checked
    on an example and a larger batch (the ONNX sibling of the FX passes' fuzz test)."""
    for seed in range(3):
        case = random_cnn(seed, max_layers=4, max_size=8)
        proto = export_onnx(case.model.eval(), case.inputs)
        calib = [case.inputs, case.other_batch()]
        ctx = PassContext(
            sample_inputs=case.inputs,
            extra_sample_inputs=[case.other_batch()],
            calibration_data=calib,
        )
        pm = PassManager([registered_passes()[name]()], ir=ONNX, strict=True)
        record = pm.run(proto, ctx).records[0]
        assert record.status == "ok" and record.comparison.ok, (seed, record)


def test_reproducer_of_an_onnx_stage_pass_reruns_it_with_its_calibration(conv_net, tmp_path):
    """The reproducer saves the ONNX model (through the ONNX IR), the sample inputs and the
    calibration batches, and its script reruns the pass on the ONNX stage."""
    import subprocess
    import sys

    from graphopt.pipeline import PassRecord, Reproducer

    proto, calib = conv_net
    sample = (torch.from_numpy(calib[0][0][:1]),)
    p = CorrectBias()
    ctx = PassContext(sample_inputs=sample, calibration_data=calib, ir=ONNX)
    record = PassRecord(0, p.name, str(p), str(p.numerics), status="failed", message="test")
    out = Reproducer(tmp_path).on_failure(0, p, proto, ctx, record)
    assert {"model.onnx", "inputs.pt", "calibration.pt", "graph.ir", "repro.py"} <= {
        f.name for f in (tmp_path / "01-correct-bias").iterdir()
    }
    run = subprocess.run(
        [sys.executable, f"{out}/repro.py"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pass ran cleanly" in run.stdout


def test_layers_whose_equal_biases_the_export_shares_are_corrected_and_quantised():
    """torch.onnx.export writes equal constants once and the others as an Identity of it (the
    zero biases of convs folded from identity BatchNorms, timm's default init): each layer must
    still own its bias, to be shifted by correct-bias and quantised by insert-qdq."""
    from torch import nn

    from graphopt.backends.export import export_onnx
    from graphopt.quant.improve import quantize_int8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    with torch.no_grad():
        model[0].bias.zero_()
        model[2].bias.zero_()
    proto = export_onnx(model, (torch.randn(1, 3, 16, 16),))
    assert "Identity" in [n.op_type for n in proto.graph.node]  # the export shared the bias
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(4, 3, 16, 16, generator=gen),) for _ in range(2)]
    _, report = quantize_int8(proto, calibration, method="minmax")
    statuses = {r.name: r.status for r in report.records}
    # no sample inputs here, so no check: "unverified"; a crash would be "failed"
    assert statuses["correct-bias"] == statuses["insert-qdq"] == "unverified", statuses
    assert report.quant.float_layers == {}, report.quant.float_layers
    assert all(d.applied for d in report.bias), [(d.node, d.reason) for d in report.bias]

"""The report a person reads: the summary first, per-layer decisions folded, layers named by
their PyTorch module path everywhere, the JSON structured, advice when nothing was gained."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.measure import Latency
from graphopt.core.names import decision_dict, layer_name
from graphopt.pipeline import PassRecord
from graphopt.quant.onnx_passes import BiasCorrection
from graphopt.report import Report
from graphopt.report.text import SHOWN, fold


def _report(**fields) -> Report:
    return Report("m", "cpu", "onnxruntime", "1.0", "fold-conv-bn,reparameterize", "fx", **fields)


def test_layer_names_are_module_paths():
    assert layer_name("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert layer_name("/features/features.3/features.3.conv/features.3.conv.0/Conv") == (
        "features.3.conv.0"
    )
    assert layer_name("/blocks/blocks.0/attn/qkv/MatMul") == "blocks.0.attn.qkv"
    assert layer_name("/layer1/layer1.0/downsample/downsample.0/Conv") == "layer1.0.downsample.0"
    assert layer_name("/blocks/blocks.0/attn/attn/MatMul") == "blocks.0.attn.attn"
    # names of another origin (a user's ONNX file, the top level) are kept
    assert layer_name("conv_12") == "conv_12" and layer_name("/Conv") == "/Conv"
    d = decision_dict(BiasCorrection("/layer1/layer1.0/conv1/Conv", "Conv", True, 0.5, 0.1))
    assert d["layer"] == "layer1.0.conv1" and d["max_abs_shift"] == 0.5
    assert "layer1.0.conv1" in str(BiasCorrection("/layer1/layer1.0/conv1/Conv", "Conv", True))


def test_many_decisions_of_one_kind_fold_into_counts_and_the_worst():
    decisions = [
        BiasCorrection(f"/l{i}/Conv", "Conv", i % 5 != 0, max_abs_shift=float(i)) for i in range(40)
    ]
    lines = fold(["a note", *decisions], "records[3].decisions")
    assert lines[0] == "a note"
    assert "40 BiasCorrection: 32 corrected, 8 not applied" in lines[1]
    assert "records[3].decisions" in lines[1]
    worst = lines[2 : 2 + SHOWN]
    assert [w.split()[3] for w in worst] == ["l39:", "l38:", "l37:"]  # largest shifts first
    assert len(lines) == 2 + SHOWN
    few = fold(decisions[:SHOWN], "x")
    assert few == [str(d) for d in decisions[:SHOWN]]


def test_summary_comes_first_and_says_what_to_try_when_nothing_was_gained():
    records = [
        PassRecord(0, "fold-conv-bn", "fold-conv-bn", "exact", modified=True, stats={"folded": 20}),
        PassRecord(1, "reparameterize", "reparameterize", "exact", stats={"convs": 20}),
    ]
    report = _report(
        records=records,
        ops_before={"Conv2d": 20, "BatchNorm2d": 20},
        ops_after={"Conv2d": 20},
        latency_baseline=Latency(10.0, 9.5, 10.5, 30),
        latency_optimized=Latency(10.1, 9.6, 10.9, 30),
        baseline_name="onnxruntime (plain export)",
    )
    text = str(report)
    summary, details = text.split("\ndetails")
    assert summary.splitlines()[1] == "  changed:     fold-conv-bn folded=20"
    assert "10.000 ms [9.5-10.5] -> graphopt 10.100 ms [9.6-10.9] (0.99x" in summary
    assert "nothing to gain (0.99x): this model has nothing to re-parameterize" in summary
    assert "try: --int8 --calibration data.npz" in summary
    assert "merge-convs{budget=0.7}" in summary
    assert "substitute-monarch" not in summary  # no dense layers to factor
    assert " 2  reparameterize" in details  # the pass table is in the details
    data = json.loads(report.to_json())
    assert data["summary"]["changed"] == [{"pass": "fold-conv-bn", "stats": {"folded": 20}}]
    assert data["summary"]["advice"][0].startswith("nothing to gain")
    report.ops_before = {"Linear": 12, "LayerNorm": 6}  # a transformer: Monarch is worth a try
    assert "try: substitute-monarch" in str(report)
    # a real gain has no advice
    report.latency_optimized = Latency(5.0, 4.9, 5.2, 30)
    assert "nothing to gain" not in str(report) and "(2.00x" in str(report)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_fx_pass_decisions_name_layers_by_module_path():
    torch.manual_seed(0)
    model = _Pair().eval()
    result = graphopt.optimize(
        model,
        "cpu",
        [torch.randn(1, 3, 16, 16)],
        pipeline="equalize-layers",
        measure=False,
    )
    decisions = result.report.records[0].decisions
    assert any("features.0 -> features.1 -> features.2" in str(d) for d in decisions), decisions
    assert "features_0" not in str(result.report)


def _int8_report_lines(name: str, size: int, samples: int, batch: int) -> list[str]:
    from graphopt import zoo

    entry = zoo.get(name)
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    calibration = [(torch.randn(batch, 3, size, size),) for _ in range(samples // batch)]
    result = graphopt.optimize(
        entry.model, "cpu", [x], precision="int8", calibration_data=calibration, measure=False
    )
    return str(result.report).splitlines()


def test_int8_report_of_a_resnet_fits_on_one_screen():
    """resnet18's int8 stage decides for 30 layers (21 with a bias shift): folded, its
    report is one screen, and its summary gives the metric in fp32 and int8."""
    lines = _int8_report_lines("resnet18", 32, 8, 4)
    assert len(lines) <= 60, "\n".join(lines)
    summary = "\n".join(lines[: lines.index("")])
    assert "int8:        30 of 30 layers" in summary and "fp32 1 -> int8 " in summary
    folded = [line for line in lines if "(all in the JSON at records[" in line]
    assert any("BiasCorrection: 21 corrected" in line for line in folded), "\n".join(lines)
    assert any("30 LayerDecision: 30 int8" in line for line in folded), "\n".join(lines)


@pytest.mark.slow
def test_int8_report_of_resnet50_fits_on_one_screen():
    lines = _int8_report_lines("resnet50", 224, 64, 8)  # 8 calibration batches
    print("\n".join(lines))  # with -s: the report itself
    assert len(lines) <= 60, "\n".join(lines)


class _Branches(nn.Module):
    """A RepVGG-like block: 3x3 and 1x1 convs with BatchNorm, summed (fold-conv-bn, then
    reparameterize change it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))


def test_latency_after_each_pass_is_measured_in_the_same_run():
    torch.manual_seed(0)
    model = _Branches().eval()
    for bn in (model.bn_a, model.bn_b):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    result = graphopt.optimize(model, "cpu", [torch.randn(1, 4, 16, 16)])
    report = result.report
    modified = [r.spec for r in report.records if r.modified]
    assert modified == ["fold-conv-bn", "reparameterize"]
    # the model after the last pass is the artifact itself: only the ones before are extra;
    # ONNX Runtime folds BatchNorm itself, so after fold-conv-bn it runs the baseline's graph
    assert report.pass_latencies == {}
    same = "latency after fold-conv-bn: ONNX Runtime runs the same graph as for the baseline"
    assert any(n.startswith(same) for n in report.notes), report.notes
    # int8 times the float model after the FX passes too: after reparameterize (branches
    # merged) ONNX Runtime runs another graph, timed in the same run
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(4, 4, 16, 16, generator=gen),) for _ in range(2)]
    int8 = graphopt.optimize(
        model, "cpu", [torch.randn(1, 4, 16, 16)], precision="int8",
        calibration_data=calibration,
    ).report  # fmt: skip
    assert list(int8.pass_latencies) == ["after reparameterize"]
    assert int8.pass_latencies["after reparameterize"].median_ms > 0
    line = "latency after each pass (median [p10-p90], same run): after reparameterize"
    assert line in str(int8)
    assert json.loads(int8.to_json())["pass_latencies"]["after reparameterize"]["p90_ms"] > 0
    assert "after reparameterize" in graphopt.report.html.render(int8.to_dict())

"""backend="auto": ONNX Runtime's session settings, OpenVINO's hints (and a tuned TVM, see
tests/backends/test_tvm.py) checked against the model, timed interleaved, the fastest kept.

Small models and the module's few rounds: real ONNX Runtime and OpenVINO sessions throughout.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import fx, nn

from graphopt import optimize
from graphopt.backends import get_backend
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import available_cores
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.core.numerics import Numerics, run_samples
from graphopt.core.pass_infra import PassContext
from graphopt.core.progress import Progress
from graphopt.lowering.auto import Candidate, local_candidates, pick
from graphopt.lowering.check import Check
from graphopt.lowering.context import Lowering
from graphopt.pipeline import PassManager
from graphopt.report import Report
from graphopt.target import Target

pytest.importorskip("openvino")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().eval()


def _x() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _expected_winner(timings: dict, default: str) -> str:
    """The lowest median where it beats ``default`` beyond noise (below its p10), else
    ``default``."""
    fastest = min(timings, key=lambda k: timings[k].median_ms)
    return fastest if timings[fastest].median_ms < timings[default].p10_ms else default


def _check_winner(result) -> str:
    """The report's candidates carry median and p10-p90; the winner is the lowest median (or
    the default ONNX Runtime settings, where the lowest is within their noise) and is what
    optimize() returned. Returns the winner's label."""
    report = result.report
    timings = report.backend_latencies
    for label, lat in timings.items():
        assert lat.p10_ms <= lat.median_ms <= lat.p90_ms, label
        assert lat.runs >= 5, label
    default = f"onnxruntime threads={available_cores()} sequential all"
    winner = _expected_winner(timings, default)
    fastest = min(timings, key=lambda k: timings[k].median_ms)
    kept = winner != fastest
    assert report.backend_choice.startswith(
        f"{default}, the default, kept: the fastest, {fastest}: the lowest median"
        if kept
        else f"{winner}: the lowest median"
    ), report.backend_choice
    assert report.backend == winner.split()[0] == result.backend.name
    artifact_type = {"onnxruntime": "OrtArtifact", "openvino": "OpenVinoArtifact"}
    assert type(result.artifact).__name__ == artifact_type[report.backend]
    assert report.threads == result.backend.threads
    return winner


@pytest.mark.slow  # ~30 s, most of it TVM's import and compile (auto lowers to TVM to see
# whether it is tuned); the fast sibling is test_local_candidates_are_checked_timed_and_ranked
def test_auto_times_onnxruntime_settings_and_openvino_hints_and_returns_the_fastest():
    x = _x()
    result = optimize(_model(), "cpu", (x,), backend="auto")
    report = result.report
    labels = list(report.backend_latencies)
    assert any(k.startswith("openvino latency") for k in labels), labels
    assert any(k.startswith("openvino throughput") for k in labels), labels
    assert any(k.startswith("onnxruntime threads=") for k in labels), labels
    if available_cores() >= 2:  # the non-spinning session is a candidate
        assert any(k.endswith("no-spin") for k in labels), labels
    _check_winner(result)
    assert "not candidates: tvm" in report.backend_choice  # untuned TVM is never timed
    assert report.ort_settings["label"] in report.ort_settings_latencies
    assert any(n.startswith("backend auto:") for n in report.notes)
    # the returned artifact computes the model
    torch.testing.assert_close(
        torch.from_numpy(result.artifact.run([x.numpy()])[0]), _model()(x), atol=1e-4, rtol=1e-4
    )


def test_non_spinning_session_setting():
    backend = OnnxRuntimeBackend("cpu").with_settings(spinning=False)
    opts = backend.session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert backend.settings()["spinning"] is False
    spinning = OnnxRuntimeBackend("cpu").session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default
        spinning.get_session_config_entry("session.intra_op.allow_spinning")


def _lowering(model: nn.Module, x: torch.Tensor) -> Lowering:
    gm = fx.symbolic_trace(model)
    manager = PassManager("")
    result = manager.run(copy.deepcopy(gm), PassContext(sample_inputs=(x,)))
    check = Check([(x,)], accept_mismatch=False)
    check.set_reference(run_samples(model, [(x,)]), model)
    return Lowering(
        graph=result.graph,
        inputs=(x,),
        input_names=["x"],
        output_names=None,
        original=gm,
        manager=manager,
        result=result,
        check=check,
        report=Report("Net", "cpu", "onnxruntime", "0", "", "symbolic_trace"),
        target=Target.parse("cpu"),
        say=Progress(False),
    )


def test_local_candidates_are_checked_timed_and_ranked():
    """ONNX Runtime's settings (the non-spinning one among them) and OpenVINO's hints on one
    ONNX model, each with median and p10-p90 in the report; pick returns the fastest median."""
    x = _x()
    lowering = _lowering(_model(), x)
    ort = get_backend("onnxruntime", "cpu")
    artifact = ort.compile(lowering.graph, (x,))
    excluded: list[str] = []
    candidates = local_candidates(lowering, ort, artifact, True, excluded)
    labels = [c.label for c in candidates]
    assert labels[0] == f"onnxruntime threads={ort.threads} sequential all"  # ort's own first
    assert {"openvino latency", "openvino throughput"} <= {k.rpartition(" ")[0] for k in labels}
    if available_cores() >= 2:
        assert f"onnxruntime threads={available_cores()} sequential all no-spin" in labels
    assert len(set(labels)) == len(labels) and not excluded
    backend, chosen = pick(lowering, candidates, Numerics.exact())
    report = lowering.report
    timings = report.backend_latencies
    assert set(timings) == set(labels)
    assert all(t.p10_ms <= t.median_ms <= t.p90_ms and t.runs >= 5 for t in timings.values())
    fastest = min(timings, key=lambda k: timings[k].median_ms)
    assert next(iter(timings)) == fastest  # ranked fastest first
    winner = _expected_winner(timings, labels[0])
    assert report.backend_choice.startswith(winner)
    assert ("the default, kept" in report.backend_choice) == (winner != fastest)
    won = next(c for c in candidates if c.label == winner)
    assert (backend, chosen) == (won.backend, won.artifact)
    assert report.backend == backend.name and report.artifact_error.ok


class _Sleeper:
    """An artifact that takes ``ms`` per run (the selection rule's test needs known speeds)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def run(self, arrays):
        time.sleep(self.ms / 1e3)
        return []


def test_auto_leaves_the_default_settings_only_for_a_gain_beyond_noise():
    from graphopt.backends.measure import Latency
    from graphopt.lowering.auto import _beyond_noise

    default = Latency(median_ms=10.0, p10_ms=9.0, p90_ms=12.0, runs=5)
    assert _beyond_noise(Latency(8.5, 8.0, 9.0, 5), default)
    assert not _beyond_noise(Latency(9.5, 8.0, 11.0, 5), default)  # within the default's p10
    x = _x()
    ort = get_backend("onnxruntime", "cpu")
    for default_ms, other_ms, switched in ((12.0, 3.0, True), (3.0, 12.0, False)):
        lowering = _lowering(_model(), x)
        candidates = [
            Candidate("onnxruntime default", ort, _Sleeper(default_ms), checked=True),
            Candidate("other", ort, _Sleeper(other_ms), checked=True),
        ]
        _, chosen = pick(lowering, candidates, Numerics.exact())
        assert chosen is candidates[1 if switched else 0].artifact
        assert lowering.report.backend_choice.startswith("other" if switched else "onnxruntime")


def test_a_candidate_that_disagrees_with_the_model_is_out():
    """An OpenVINO artifact of other weights (a real compile that computes something else)
    is excluded before timing, and the report says so."""
    x = _x()
    lowering = _lowering(_model(), x)
    ort = get_backend("onnxruntime", "cpu")
    right = ort.load(export_onnx(_model(), (x,)))
    openvino = get_backend("openvino", "cpu")
    wrong = openvino.load(export_onnx(_model(seed=1), (x,)))
    candidates = [
        Candidate("onnxruntime default", ort, right),
        Candidate("openvino latency", openvino, wrong),
    ]
    backend, artifact = pick(lowering, candidates, Numerics.exact())
    report = lowering.report
    assert backend is ort and artifact is right
    assert list(report.backend_latencies) == ["onnxruntime default"]
    assert "not candidates: openvino latency: differs from the model" in report.backend_choice
    assert any("openvino latency is out: differs" in w for w in report.warnings)


def test_int8_auto_considers_openvino_on_the_same_qdq_model():
    x = _x()
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(4, 3, 16, 16, generator=gen),) for _ in range(2)]
    result = optimize(
        _model(), "cpu", (x,), precision="int8", backend="auto", calibration_data=calibration
    )
    report = result.report
    winner = _check_winner(result)
    assert any(k.startswith("onnxruntime") for k in report.backend_latencies)
    # OpenVINO is timed, or out with the reason (its int8 kernels saturate on x86 without VNNI)
    timed = any(k.startswith("openvino") for k in report.backend_latencies)
    assert timed or "openvino" in report.backend_choice.partition("not candidates:")[2]
    assert "tvm: no integer kernels" in report.backend_choice
    if winner.startswith("openvino"):  # which layers run on OpenVINO's int8 kernels
        assert any("OpenVINO runs" in d for d in report.records[-1].decisions)
    assert result.artifact.proto.graph.node  # the QDQ model the winner runs
    assert any(n.op_type == "QuantizeLinear" for n in result.artifact.proto.graph.node)

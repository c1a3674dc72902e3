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


def _check_choice(report, default: str) -> str:
    """The choice the report describes: the lowest median where it beats ``default`` beyond
    noise (below its p10); else the two timed again (the runoff), whose outcome the report
    gives. Returns the chosen label."""
    timings = report.backend_latencies
    fastest = min(timings, key=lambda k: timings[k].median_ms)
    if fastest == default or timings[fastest].median_ms < timings[default].p10_ms:
        assert report.backend_choice.startswith(f"{fastest}: the lowest median")
        return fastest
    chosen, _, rest = report.backend_choice.partition(": in the first run ")
    assert chosen in (fastest, default) and rest.startswith(f"{fastest}: the lowest median")
    assert "timed again against the default over" in rest
    assert ("the default is kept" in rest) == (chosen == default)
    return chosen


def _check_winner(result) -> str:
    """The report's candidates carry median and p10-p90; the winner is the report's choice
    (:func:`_check_choice`) and is what optimize() returned. Returns the winner's label."""
    report = result.report
    timings = report.backend_latencies
    for label, lat in timings.items():
        assert lat.p10_ms <= lat.median_ms <= lat.p90_ms, label
        assert lat.runs >= 5, label
    winner = _check_choice(report, f"onnxruntime threads={available_cores()} sequential all")
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
    winner = _check_choice(report, labels[0])
    won = next(c for c in candidates if c.label == winner)
    assert (backend, chosen) == (won.backend, won.artifact)
    assert report.backend == backend.name and report.artifact_error.ok


class _Sleeper:
    """An artifact whose runs take ``ms`` in turn (known speeds for the selection rule)."""

    def __init__(self, *ms: float) -> None:
        self.ms, self.calls = list(ms), 0

    def run(self, arrays):
        time.sleep(self.ms[self.calls % len(self.ms)] / 1e3)
        self.calls += 1
        return []


def test_auto_leaves_the_default_settings_only_for_a_gain_beyond_noise():
    from graphopt.backends.measure import Latency
    from graphopt.lowering.auto import _beyond_noise

    default = Latency(median_ms=10.0, p10_ms=9.0, p90_ms=12.0, runs=5)
    assert _beyond_noise(Latency(8.5, 8.0, 9.0, 5), default)
    assert not _beyond_noise(Latency(9.5, 8.0, 11.0, 5), default)  # within the default's p10
    x, ort = _x(), get_backend("onnxruntime", "cpu")

    def choose(default: _Sleeper, other: _Sleeper, slower_after_first_run: bool = False):
        lowering = _lowering(_model(), x)
        if slower_after_first_run:  # the first run's lead was noise: gone when timed again
            lowering.say = lambda line: "again" in line and other.ms.__setitem__(0, 12.0)
        candidates = [
            Candidate("onnxruntime default", ort, default, checked=True),
            Candidate("other", ort, other, checked=True),
        ]
        _, chosen = pick(lowering, candidates, Numerics.exact())
        return chosen, lowering.report.backend_choice

    # far faster than the default's fastest calls: chosen at once
    chosen, why = choose(_Sleeper(12.0), fast := _Sleeper(3.0))
    assert chosen is fast and why.startswith("other: the lowest median")
    # the default is fastest: kept at once
    chosen, why = choose(slow := _Sleeper(3.0), _Sleeper(12.0))
    assert chosen is slow and why.startswith("onnxruntime default: the lowest median")
    # faster by the median but within the default's spread (1-9 ms): timed again, still faster
    chosen, why = choose(_Sleeper(1.0, 9.0), steady := _Sleeper(4.0))
    assert chosen is steady and why.startswith("other: in the first run other: the lowest")
    assert "timed again against the default" in why
    # ... and where it is slower when timed again, the default stays
    chosen, why = choose(noisy := _Sleeper(1.0, 9.0), _Sleeper(4.0), slower_after_first_run=True)
    assert chosen is noisy and why.endswith("not 1% faster, the default is kept")


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

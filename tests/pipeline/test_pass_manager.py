"""The pass manager: verification after each pass, rollback, strict mode, instruments."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn

from graphopt.core.numerics import Numerics, compare, exact_tolerance, run_module
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.printing import canonical_ir, fingerprint
from graphopt.errors import PassError, VerificationError
from graphopt.frontends.torch import capture
from graphopt.pipeline import DumpIR, PassManager, PrintIR, PrintTiming, Reproducer
from graphopt.testing import randomize_bn


class ScaleConvWeights(Pass):
    """A wrong rewrite: multiplies every conv weight by ``factor``."""

    name = "scale-conv-weights"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        factor: float = 1.5

    def run(self, gm, ctx):
        n = 0
        for m in gm.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.mul_(self.options.factor)
                n += 1
        return PassResult(gm, modified=n > 0, stats=Counter(scaled=n))


class Explode(Pass):
    name = "explode"

    def run(self, gm, ctx):
        conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        conv.weight.data.mul_(-1)  # leaves the model half-rewritten
        raise RuntimeError("boom")


class BreakGraph(Pass):
    """Returns a graph that fails lint (a use of an erased node)."""

    name = "break-graph"

    def run(self, gm, ctx):
        relu = next(n for n in gm.graph.nodes if n.op == "call_module" and "1" in n.target)
        with gm.graph.inserting_before(relu):
            dangling = gm.graph.call_function(torch.neg, (relu,))
        relu.replace_all_uses_with(dangling, delete_user_cb=lambda u: u is not dangling)
        return PassResult(gm, modified=True)


class Noisy(Pass):
    """A lossy pass: adds a tiny bias to the last conv."""

    name = "noisy"
    numerics = Numerics.lossy("cosine", 0.999)

    def run(self, gm, ctx):
        conv = [m for m in gm.modules() if isinstance(m, nn.Conv2d)][-1]
        conv.bias.data.add_(1e-3)
        return PassResult(gm, modified=True)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
    ).eval()
    randomize_bn(m[3], torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 6, 6)
    return m, x


def _gm():
    m, x = _model()
    return capture(m, (x,)).graph, x


def test_breaking_pass_is_rolled_back_and_reported():
    gm, x = _gm()
    expected = run_module(gm, (x,))
    result = PassManager([ScaleConvWeights()]).run(gm, PassContext(sample_inputs=(x,)))
    (record,) = result.records
    assert record.status == "rolled-back"
    assert record.comparison is not None and not record.comparison.ok
    assert record.comparison.measured > record.comparison.allowed
    assert "broke its numeric contract exact" in record.message
    # the graph handed back computes what it did before
    got = run_module(result.graph, (x,))
    assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize("mode", [torch.enable_grad, torch.inference_mode])
def test_pipeline_continues_after_a_rollback(mode):
    gm, x = _gm()
    with mode():
        ctx = PassContext(sample_inputs=(x,))
        result = PassManager("remove-identity", strict=False).run(gm, ctx)
        pm = PassManager([ScaleConvWeights(), *PassManager("fold-conv-bn").passes])
        result = pm.run(result.graph, ctx)
    assert [r.status for r in result.records] == ["rolled-back", "ok"]
    assert result.records[1].stats["folded"] == 1
    assert result.end_to_end.ok


def test_strict_mode_raises_verification_error_naming_pass_output_and_error():
    gm, x = _gm()
    with pytest.raises(VerificationError) as info:
        PassManager([ScaleConvWeights()], strict=True).run(gm, PassContext(sample_inputs=(x,)))
    err = info.value
    assert err.pass_name == "scale-conv-weights"
    assert err.output == "output[0]"
    assert err.measured > err.allowed > 0
    assert "scale-conv-weights" in str(err) and "output[0]" in str(err)


def test_exception_in_pass_restores_the_graph_and_strict_raises_pass_error(tmp_path):
    gm, x = _gm()
    before = fingerprint(gm)
    result = PassManager([Explode()], instruments=[Reproducer(tmp_path)]).run(
        gm, PassContext(sample_inputs=(x,))
    )
    assert result.records[0].status == "failed"
    assert "RuntimeError: boom" in result.records[0].message
    assert fingerprint(result.graph) == before
    gm, x = _gm()
    with pytest.raises(PassError, match="boom") as info:
        PassManager([Explode()], strict=True).run(gm, PassContext(sample_inputs=(x,)))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.position == 0


def test_invalid_graph_is_caught_by_lint_and_rolled_back():
    gm, x = _gm()
    before = canonical_ir(gm)
    result = PassManager([BreakGraph()]).run(gm, PassContext(sample_inputs=(x,)))
    assert result.records[0].status == "failed"
    assert canonical_ir(result.graph) == before


def test_lossy_pass_is_checked_against_its_metric():
    gm, x = _gm()
    result = PassManager([Noisy()]).run(gm, PassContext(sample_inputs=(x,)))
    record = result.records[0]
    assert record.status == "ok" and record.comparison.metric == "cosine"
    assert record.comparison.measured >= 0.999
    assert result.end_to_end.metric == "cosine"


def test_without_sample_inputs_passes_are_marked_unverified():
    gm, _ = _gm()
    result = PassManager("fold-conv-bn").run(gm, PassContext())
    assert result.records[0].status == "unverified"
    assert result.end_to_end is None


def test_reproducer_reruns_the_failure(tmp_path):
    gm, x = _gm()
    result = PassManager("fold-conv-bn", instruments=[Reproducer(tmp_path)]).run(
        gm, PassContext(sample_inputs=(x,))
    )
    assert result.records[0].status == "ok"
    gm, x = _gm()
    result = PassManager([Explode()], instruments=[Reproducer(tmp_path)]).run(
        gm, PassContext(sample_inputs=(x,))
    )
    repro = tmp_path / "01-explode"
    assert result.records[0].reproducer == str(repro)
    assert {"graph.pt", "inputs.pt", "graph.ir", "repro.py"} <= {p.name for p in repro.iterdir()}
    # the saved graph loads and computes what the graph before the pass computed
    loaded = torch.load(repro / "graph.pt", weights_only=False)
    inputs = torch.load(repro / "inputs.pt", weights_only=False)
    assert torch.equal(run_module(loaded, inputs)[0], run_module(result.graph, (x,))[0])


def test_reproducer_script_runs_for_registered_passes(tmp_path):
    gm, x = _gm()
    fold = PassManager("fold-conv-bn").passes[0]
    record_dir = Reproducer(tmp_path).on_failure(
        0,
        fold,
        gm,
        PassContext(sample_inputs=(x,)),
        __import__("graphopt.pipeline", fromlist=["PassRecord"]).PassRecord(
            0, fold.name, str(fold), str(fold.numerics), status="failed", message="test"
        ),
    )
    out = subprocess.run(
        [sys.executable, f"{record_dir}/repro.py"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "pass ran cleanly" in out.stdout


def test_instruments_print_and_dump_ir(tmp_path, capsys):
    import io

    gm, x = _gm()
    stream, timing = io.StringIO(), io.StringIO()
    PassManager(
        "remove-identity,fold-conv-bn",
        instruments=[PrintIR(stream), PrintTiming(timing, total=2), DumpIR(tmp_path)],
    ).run(gm, PassContext(sample_inputs=(x,)))
    text = stream.getvalue()
    assert "IR after fold-conv-bn" in text and "-%3 = BatchNorm2d" in text
    assert "IR after remove-identity" not in text  # unchanged passes print nothing
    lines = timing.getvalue().splitlines()
    assert "[1/2] remove-identity" in lines[0] and "unchanged" in lines[0]
    assert "[2/2] fold-conv-bn" in lines[1] and "folded=1" in lines[1]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "00-input.ir",
        "01-remove-identity.diff",
        "01-remove-identity.ir",
        "02-fold-conv-bn.diff",
        "02-fold-conv-bn.ir",
    ]
    assert "BatchNorm2d" not in (tmp_path / "02-fold-conv-bn.ir").read_text()
    assert "f32[2,4,6,6]" in (tmp_path / "02-fold-conv-bn.ir").read_text()


def test_numerics_describe_and_validate():
    assert str(Numerics.exact()) == "exact"
    assert str(Numerics.lossy("top1", 0.99)) == "lossy(top1 >= 0.99)"
    assert str(Numerics.lossy("max_abs", 0.1)) == "lossy(max_abs <= 0.1)"
    with pytest.raises(ValueError, match="unknown metric"):
        Numerics.lossy("psnr", 30)


def test_exact_tolerance_scales_with_output_magnitude():
    ref = torch.randn(100)
    assert exact_tolerance(ref * 1000) == pytest.approx(1000 * exact_tolerance(ref))
    big = compare([ref * 1000], [ref * 1000 + 1e-3], Numerics.exact())
    small = compare([ref], [ref + 1e-3], Numerics.exact())
    assert big.ok and not small.ok


def test_compare_reports_shape_mismatch_and_nan():
    ref = torch.ones(2, 3)
    assert not compare([ref], [torch.ones(3, 2)], Numerics.exact()).ok
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not compare([ref], [nan], Numerics.exact()).ok


def test_canonical_ir_ignores_module_names():
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.relu(self.first(x))

    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.other_name = nn.Conv2d(3, 4, 3)

        def forward(self, inp):
            return torch.relu(self.other_name(inp))

    a, b = fx.symbolic_trace(A()), fx.symbolic_trace(B())
    assert canonical_ir(a) == canonical_ir(b)
    assert fingerprint(a) != fingerprint(b)  # different random weights
    b.other_name.load_state_dict(a.first.state_dict())
    assert canonical_ir(a, elide_constants=False) == canonical_ir(b, elide_constants=False)


class _Annotated(nn.Module):
    """forward annotated in a file with ``from __future__ import annotations`` (this one):
    FX keeps ``'torch.Tensor'`` as a string type on the placeholder."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_reproducer_saves_the_graph_of_a_module_with_string_annotations(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    gm = capture(_Annotated().eval(), (x,)).graph
    PassManager([Explode()], instruments=[Reproducer(tmp_path)]).run(
        gm, PassContext(sample_inputs=(x,))
    )
    repro = tmp_path / "01-explode"
    assert (repro / "graph.pt").exists()  # was "'str' object has no attribute '__name__'"
    assert "could not be saved" not in (repro / "repro.py").read_text()


def test_snapshots_keep_graphs_whose_structure_changed_not_weights_only_passes():
    """optimize() times the graph after each pass from Snapshots; equalize-layers rescales
    weights only, so the graph after it runs as the one before and is not kept to be timed."""
    from graphopt.pipeline import Snapshots

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    randomize_bn(model[1], torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 8, 8)
    snapshots = Snapshots()
    result = PassManager("fold-conv-bn,equalize-layers", instruments=[snapshots]).run(
        capture(model, (x,)).graph, PassContext(sample_inputs=(x,))
    )
    assert [r.modified for r in result.records] == [True, True]
    assert [spec for spec, _ in snapshots.graphs] == ["fold-conv-bn"]
    assert snapshots.weights_only == ["equalize-layers"]
    # the kept graph is a copy taken before equalize-layers changed the weights
    kept = snapshots.graphs[0][1]
    assert not torch.equal(kept.get_submodule("0").weight, result.graph.get_submodule("0").weight)

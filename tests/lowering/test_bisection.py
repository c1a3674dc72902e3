"""Bisection of an artifact that disagrees with the model: the ``Bisect`` instrument and the
search over it in ``graphopt.lowering.check``.

The backend here is a stand-in: it "lowers" a graph by running it in torch with one function
computing something else once lowered, so every probe is cheap and the culprit is known.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx, nn

import graphopt
from graphopt.core.numerics import Numerics, run_samples
from graphopt.core.pass_infra import PassContext
from graphopt.core.progress import Progress
from graphopt.lowering.check import Check, bisect_lowering
from graphopt.lowering.context import Lowering
from graphopt.pipeline import Bisect, PassManager
from graphopt.report import Report
from graphopt.target import Target

RUNS: dict[str, int] = {}  # pass name -> how many times it ran (the probes that reran it)
LOWERED = {"now": False}  # set while the stand-in backend runs an artifact


def tag(x, label):
    """The identity in torch and in every lowering, but for the label "breaks" once lowered."""
    return x + 1.0 if LOWERED["now"] and label == "breaks" else x


torch.fx.wrap("tag")


def _tagging_pass(pass_name: str, label: str, *, modifies: bool = True) -> type:
    class Tag(graphopt.Pass):
        name = pass_name
        numerics = graphopt.Numerics.exact()

        def run(self, gm, ctx):
            RUNS[self.name] = RUNS.get(self.name, 0) + 1
            if not modifies:
                return graphopt.PassResult(gm, modified=False)
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                node = gm.graph.call_function(tag, (out.args[0], label))
            out.args = (node,)
            gm.recompile()
            return graphopt.PassResult(gm, modified=True)

    return graphopt.register_pass(Tag)


for _name, _label, _modifies in [
    ("test-bisect-a", "fine", True),
    ("test-bisect-b", "fine", True),
    ("test-bisect-idle", "fine", False),
    ("test-bisect-breaks", "breaks", True),
    ("test-bisect-c", "fine", True),
    ("test-bisect-d", "fine", True),
]:
    _tagging_pass(_name, _label, modifies=_modifies)


class _Artifact:
    static_shape_reason = None
    cross_compiled = False
    rpc = None

    def __init__(self, module: nn.Module, shift: float) -> None:
        self.module, self.shift = module, shift

    def run(self, arrays):
        LOWERED["now"] = True
        try:
            with torch.no_grad():
                out = self.module(*[torch.from_numpy(np.asarray(a)) for a in arrays])
        finally:
            LOWERED["now"] = False
        return [(out + self.shift).numpy()]


class StandIn:
    """A backend that runs the graph in torch (``shift``: a wrong constant it adds itself)."""

    name = "stand-in"

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.compiles = 0

    def compile(
        self,
        module,
        example_inputs,
        *,
        input_names=None,
        output_names=None,
        dynamic_axes=None,
        output_axes=None,
    ):
        self.compiles += 1
        return _Artifact(copy.deepcopy(module), self.shift)

    def without_tuning(self):
        return self


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _lowering(pipeline: str) -> Lowering:
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = fx.symbolic_trace(model)
    original = copy.deepcopy(gm)
    manager = PassManager(pipeline)
    result = manager.run(gm, PassContext(sample_inputs=(x,)))
    check = Check([(x,)], accept_mismatch=False)
    check.set_reference(run_samples(model, [(x,)]), model)
    report = Report("Net", "cpu", "stand-in", "0", pipeline, "symbolic_trace")
    return Lowering(
        graph=result.graph,
        inputs=(x,),
        input_names=["x"],
        output_names=None,
        original=original,
        manager=manager,
        result=result,
        check=check,
        report=report,
        target=Target.parse("cpu"),
        say=Progress(False),
    )


def test_bisect_instrument_lets_the_first_n_passes_run():
    RUNS.clear()
    pipeline = "test-bisect-a,test-bisect-b,test-bisect-c"
    gm = fx.symbolic_trace(Net())
    result = PassManager(pipeline, instruments=[Bisect(2)]).run(gm)
    assert [r.status for r in result.records] == ["unverified", "unverified", "skipped"]
    assert RUNS == {"test-bisect-a": 1, "test-bisect-b": 1}
    # among: only the listed positions count, in order; the rest never run
    RUNS.clear()
    gm = fx.symbolic_trace(Net())
    result = PassManager(pipeline, instruments=[Bisect(1, among=[1, 2])]).run(gm)
    assert [r.status for r in result.records] == ["skipped", "unverified", "skipped"]
    assert RUNS == {"test-bisect-b": 1}


def test_bisection_names_the_first_pass_that_does_not_survive_lowering():
    pipeline = "test-bisect-a,test-bisect-b,test-bisect-idle,test-bisect-breaks,test-bisect-c"
    lowering = _lowering(pipeline + ",test-bisect-d")
    assert all(r.status == "ok" for r in lowering.result.records)  # in torch, all agree
    RUNS.clear()
    backend = StandIn()
    stage, diagnosis = bisect_lowering(backend, lowering, Numerics.exact())
    assert stage == "pass test-bisect-breaks"
    assert "first disagrees after pass test-bisect-breaks" in diagnosis
    assert "stand-in" in diagnosis
    # a binary search over the 5 passes that changed the graph: 1 + ceil(log2 5) probes at most
    assert backend.compiles <= 4
    # a pass that changed nothing in the full run is never rerun by a probe
    assert "test-bisect-idle" not in RUNS


def test_bisection_blames_a_backend_that_is_wrong_without_any_pass():
    lowering = _lowering("test-bisect-a,test-bisect-b")
    stage, diagnosis = bisect_lowering(StandIn(shift=0.5), lowering, Numerics.exact())
    assert stage == "backend stand-in"
    assert "ONNX Runtime runs it right" in diagnosis

"""Fuzzing: random models through capture and whole pipelines, judged on fresh inputs.

The CI profile runs 1,000 models through the CPU target's default pipeline and 1,000 others
through the full exact pipeline (every exact pass, merge-convs included), each model under the
grad mode it draws (plain, ``no_grad``, ``inference_mode``, or built under ``inference_mode``),
and compares the final graph with the original model on a fresh input of another batch size
under the exact contract, also under ``inference_mode``. The ``slow`` profile runs 10,000 per
pipeline. A failure message names the seed: ``fuzz([seed], pipeline, families=[family])``
reruns it, ``fuzz_case(seed, family)`` is the model.
"""

from __future__ import annotations

import collections
import operator

import pytest
import torch
from torch import fx, nn

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import registered_passes
from graphopt.frontends.torch import capture
from graphopt.target import Target
from graphopt.testing import (
    EXTENDED_KINDS,
    FAMILIES,
    FULL_EXACT_PIPELINE,
    UnitCostBackend,
    assert_pass_preserves,
    fuzz,
    fuzz_case,
    random_bn,
    random_cnn,
    run_pass,
    verify_rewrite,
)

CI_MODELS = 1_000
SLOW_MODELS = 10_000
DEFAULT_PIPELINE = Target.parse("cpu").default_pipeline
_DRAWN = {name for name, (weight, _) in FAMILIES.items() if weight > 0}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_clean(report) -> None:
    assert report.models > 0
    assert not report.bad(), report.summary()


# ------------------------------------------------------------------------------------------------
# the CI profile


def test_ci_profile_default_pipeline():
    report = fuzz(range(CI_MODELS), DEFAULT_PIPELINE)
    assert report.models == CI_MODELS
    _assert_clean(report)
    # every family ran, and the passes did rewrite (a profile where nothing fires proves nothing)
    assert set(report.by_family) == _DRAWN, report.summary()
    assert report.counts["ok"] >= CI_MODELS // 2, report.summary()
    assert report.stats["fold-conv-bn:folded"] > 500, dict(report.stats)
    assert report.stats["reparameterize:branches-merged"] > 100, dict(report.stats)


def test_ci_profile_full_exact_pipeline():
    report = fuzz(range(CI_MODELS, 2 * CI_MODELS), FULL_EXACT_PIPELINE)
    assert report.models == CI_MODELS
    _assert_clean(report)
    assert set(report.by_family) == _DRAWN, report.summary()
    assert report.stats["merge-convs:merged-spans"] > 20, dict(report.stats)
    assert report.stats["reparameterize:branches-merged"] > 100, dict(report.stats)
    assert report.stats["equalize-layers:equalized"] > 20, dict(report.stats)


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline", [DEFAULT_PIPELINE, FULL_EXACT_PIPELINE], ids=["default", "full"]
)
def test_slow_profile(pipeline):
    report = fuzz(range(100_000, 100_000 + SLOW_MODELS), pipeline)
    assert report.models == SLOW_MODELS
    _assert_clean(report)


def test_merge_convs_timed_on_onnx_runtime_keeps_the_contract():
    """The CI profile times merge-convs with a unit-cost model (deterministic, every merge
    taken); a few models timed for real on ONNX Runtime take the same path to the backend."""
    from graphopt.backends import get_backend

    backend = get_backend("onnxruntime", "cpu")
    pipeline = "fold-conv-bn,merge-convs{cache=false,runs=3,max_time_s=0.5}"
    report = fuzz(range(5_000, 5_012), pipeline, families=["cnn"], backend=backend)
    _assert_clean(report)
    assert report.stats["merge-convs:timed-units"] > 0, dict(report.stats)


# A family graphopt does not handle yet (weight 0: not in the profiles above until fixed).
# export-fallback: the torch.export fallback specialises the batch size although capture
# declares it dynamic: the graph raises a raw AssertionError ('Guard failed: x.size()[0] == 2')
# on another batch size. Suspected: capture.py (torch.export without dynamic_shapes).


@pytest.mark.parametrize(
    "pipeline", [DEFAULT_PIPELINE, FULL_EXACT_PIPELINE], ids=["default", "full"]
)
def test_models_updating_their_own_state_are_refused_or_kept(pipeline):
    report = fuzz(range(30), pipeline, families=["state-update"])
    _assert_clean(report)
    assert report.counts["refused"] + report.counts["ok"] == 30, report.summary()


@pytest.mark.xfail(
    strict=True,
    reason="the torch.export fallback is static (capture declares it so and optimize refuses "
    "other batches): a dynamic export builds padding from sym_size, which reparameterize does "
    "not read yet",
)
def test_models_captured_through_torch_export_take_other_batch_sizes():
    _assert_clean(fuzz(range(20), DEFAULT_PIPELINE, families=["export-fallback"]))


# ------------------------------------------------------------------------------------------------
# the generator covers what the independent fuzz run found


def test_generator_draws_every_kind_op_and_family():
    kinds, ops, flags = collections.Counter(), collections.Counter(), collections.Counter()
    for seed in range(400):
        for s in random_cnn(seed, kinds=EXTENDED_KINDS, max_layers=5, max_size=8).spec:
            kinds[s["kind"]] += 1
            if s["kind"] == "inplace":
                ops[s["op"]] += 1
                flags["unused-statement" if not s["use_result"] else "used"] += 1
                flags[f"on-{s['where']}-output"] += 1
            if s["kind"] == "shape":
                ops[s["op"]] += 1
    assert set(kinds) == set(EXTENDED_KINDS) | {"head", "view_head"}, kinds
    assert min(kinds.values()) >= 10, kinds
    assert min(ops.values()) >= 5, ops
    assert min(flags.values()) >= 20, flags
    families = collections.Counter(
        fuzz_case(seed, max_layers=1).family for seed in range(CI_MODELS) if seed % 10 == 0
    )
    assert set(families) == _DRAWN, families


def test_unused_inplace_statements_are_in_the_traced_graph():
    """An unused ``v.mul_(s)`` / ``torch.relu_(v)`` stays a node without users: the very shape
    a dead-code rule deletes."""
    found = collections.Counter()
    for seed in range(200):
        case = random_cnn(seed, kinds=EXTENDED_KINDS, max_layers=5, max_size=8)
        if not any(s["kind"] == "inplace" and not s["use_result"] for s in case.spec):
            continue
        gm = capture(case.model, case.inputs).graph
        for n in gm.graph.nodes:
            name = getattr(n.target, "__name__", str(n.target))
            if name.endswith("_") and n.op in ("call_method", "call_function") and not n.users:
                found[name] += 1
            if n.target is operator.iadd:
                found["iadd"] += 1
    assert {"mul_", "add_", "relu_"} <= set(found), found


def test_fuzz_models_are_reproducible_from_their_seed():
    for seed in (3, 77, 1234):
        a, b = fuzz_case(seed), fuzz_case(seed)
        assert (a.family, a.mode, a.spec, a.note) == (b.family, b.mode, b.spec, b.note)
        for x, y in zip(a.inputs + a.other_inputs, b.inputs + b.other_inputs, strict=True):
            assert torch.equal(x, y)
        for (k, v), (_, w) in zip(
            a.model.state_dict().items(), b.model.state_dict().items(), strict=True
        ):
            assert torch.equal(v, w), k


def test_onnx_family_keeps_batchnorm_unfolded_and_the_batch_dynamic():
    import onnx

    checked = 0
    for seed in range(400):
        fc = fuzz_case(seed, max_layers=3)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fc.model.modules())
        if fc.family != "onnx" or not has_bn:
            continue
        proto = onnx.load_from_string(fc.source)
        assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
        dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim.dim_param and not dim.dim_value
        checked += 1
    assert checked >= 5


def test_float64_and_half_families_keep_their_dtype():
    dtypes = collections.Counter()
    for seed in range(300):
        fc = fuzz_case(seed, max_layers=2)
        if fc.family in ("float64", "half"):
            dtypes[fc.inputs[0].dtype] += 1
            assert all(p.dtype == fc.inputs[0].dtype for p in fc.model.parameters())
    assert set(dtypes) == {torch.float64, torch.float16, torch.bfloat16}, dtypes


# ------------------------------------------------------------------------------------------------
# the oracle catches what it is for: passes that are wrong in ways the pass manager misses


class _FreezeBatch(Pass):
    """Wrong on purpose: replaces sizes read at run time by the example input's (what a
    re-export that freezes shape tensors does). Right on the example inputs only."""

    name = "freeze-batch"
    numerics = Numerics.exact()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        changed = 0
        for node in list(gm.graph.nodes):
            tensor = None
            if node.op == "call_method" and node.target == "size" and node.args[1:] == (0,):
                tensor = node.args[0]  # x.size(0)
            elif node.op == "call_function" and node.target is operator.getitem:
                shape = node.args[0]  # x.shape[0]
                if (
                    isinstance(shape, fx.Node)
                    and shape.target is getattr
                    and shape.args[1] == "shape"
                    and node.args[1] == 0
                ):
                    tensor = shape.args[0]
            if tensor is None:
                continue
            node.replace_all_uses_with(int(tensor.meta["tensor_meta"].shape[0]))
            gm.graph.erase_node(node)
            changed += 1
        gm.recompile()
        return PassResult(gm, modified=bool(changed), stats=collections.Counter(frozen=changed))


class _DropUnusedInplace(Pass):
    """Wrong on purpose: deletes statements whose result is unused, in-place ones included."""

    name = "drop-unused-inplace"
    numerics = Numerics.exact()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        dropped = 0
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("call_method", "call_function") and not node.users:
                gm.graph.erase_node(node)
                dropped += 1
        gm.recompile()
        return PassResult(gm, modified=bool(dropped), stats=collections.Counter(dropped=dropped))


def test_a_pass_that_freezes_the_batch_size_is_caught_on_another_batch():
    seeds = [
        s
        for s in range(300)
        if fuzz_case(s, "cnn", max_layers=1).family == "cnn"
        and any(x["kind"] == "view_head" for x in fuzz_case(s, "cnn").spec)
    ][:8]
    assert seeds
    report = fuzz(seeds, [_FreezeBatch()], families=["cnn"])
    assert report.stats["freeze-batch:frozen"] > 0
    assert len(report.bad("mismatch", "crash")) == len(seeds), report.summary()


def test_a_pass_that_drops_unused_inplace_statements_is_caught():
    seeds = [
        s
        for s in range(300)
        if any(x["kind"] == "inplace" and not x["use_result"] for x in fuzz_case(s, "cnn").spec)
    ][:8]
    assert seeds
    report = fuzz(seeds, [_DropUnusedInplace()], families=["cnn"])
    assert report.stats["drop-unused-inplace:dropped"] > 0
    # the strict pass manager refuses it on the example inputs already
    assert len(report.bad()) == len(seeds), report.summary()


def test_an_input_mutated_in_place_is_refused_or_kept_never_lost():
    report = fuzz(range(40), DEFAULT_PIPELINE, families=["inplace-input"])
    assert report.by_family["inplace-input"]["ok"] + report.counts["refused"] == 40, (
        report.summary()
    )
    _assert_clean(report)


# ------------------------------------------------------------------------------------------------
# the public testing helpers under inference_mode() and no_grad()


class _RepVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k3 = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, bias=False), random_bn(nn.BatchNorm2d, 4, 1)
        )
        self.k1 = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), random_bn(nn.BatchNorm2d, 4, 2))
        self.id = random_bn(nn.BatchNorm2d, 4, 3)

    def forward(self, x):
        return self.k3(x) + self.k1(x) + self.id(x)


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = random_bn(nn.BatchNorm2d, 4, 4)

    def forward(self, x):
        return self.bn(self.conv(x))


class _FoldedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("built_inside", [False, True])
def test_helpers_work_under_inference_mode_and_no_grad(mode, built_inside):
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    other = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(built_inside):
        repvgg, convbn = _RepVGG().eval(), _ConvBN().eval()
    with ctx():
        result = assert_pass_preserves(
            "reparameterize", repvgg, (x,), more_inputs=[(other,)], expect_modified=True
        )
        assert result.stats["branches-merged"] == 3, dict(result.stats)
        gm, folded = run_pass("fold-conv-bn", convbn, (x,))
        assert folded.stats["folded"] == 1
        verify_rewrite("fold-conv-bn", convbn, _FoldedConv(), (x,))


# graphopt's own passes: test modules collected before this one register deliberately wrong ones
# the FX stage's passes; int8's ONNX-stage passes have their counterpart in
# tests/quant/test_onnx_stage.py (they rewrite ONNX models, not FX graphs)
_OWN_PASSES = sorted(
    n
    for n, c in registered_passes().items()
    if c.__module__.startswith("graphopt.") and c.ir == "fx"
)


@pytest.mark.parametrize("name", _OWN_PASSES)
def test_every_registered_pass_keeps_its_contract_under_inference_mode(name):
    """Each pass with its default options, outside and inside inference_mode(), on random
    models of the wider generator (merge-convs and substitute-monarch timed by the unit-cost
    model)."""
    for seed in range(4):
        case = random_cnn(seed, kinds=EXTENDED_KINDS, max_layers=4, max_size=8)
        ctx = PassContext(
            sample_inputs=case.inputs,
            backend=UnitCostBackend(),
            calibration_data=[case.inputs],
        )
        assert_pass_preserves(
            name,
            case.model,
            case.inputs,
            more_inputs=[case.other_batch()],
            ctx=ctx,
            inference_mode=True,
        )


def test_assert_pass_preserves_checks_inference_mode_on_request():
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    result = assert_pass_preserves(
        "reparameterize", _RepVGG().eval(), (x,), expect_modified=True, inference_mode=True
    )
    assert result.stats["branches-merged"] == 3, dict(result.stats)


class _BreaksUnderInferenceMode(Pass):
    """Wrong on purpose: a pass that rewrites only outside inference_mode."""

    name = "breaks-under-inference-mode"
    numerics = Numerics.exact()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if torch.is_inference_mode_enabled():
            return PassResult(gm, modified=False)
        for node in gm.graph.nodes:
            if node.op == "output":
                with gm.graph.inserting_before(node):
                    same = gm.graph.call_function(torch.clone, (node.args[0],))
                node.args = (same,)
        gm.recompile()
        return PassResult(gm, modified=True, stats=collections.Counter(cloned=1))


def test_assert_pass_preserves_inference_mode_option_catches_a_mode_dependent_pass():
    x = torch.randn(2, 4, 6, 6)
    assert_pass_preserves(_BreaksUnderInferenceMode(), _FoldedConv(), (x,))
    with pytest.raises(AssertionError, match="inference_mode"):
        assert_pass_preserves(_BreaksUnderInferenceMode(), _FoldedConv(), (x,), inference_mode=True)

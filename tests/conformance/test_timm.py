"""timm's architectures through ``optimize()``: the conformance suite's timm part.

Each model (tests/conformance/timm_cases.py: random init, random BatchNorm statistics, eval
mode, small input) goes through ``graphopt.optimize(model, "cpu", example_inputs=...,
measure=False)`` with the default pipeline. It must either return an artifact within the exact
contract (optimize checks it and raises VerificationError otherwise) or refuse with a clear
GraphoptError; a raw crash (graphopt's InternalError) is a failure. A CI-fast subset runs by
default; the full list, the ONNX path and most re-parameterization checks are ``slow``
(``pytest -m slow tests/conformance/test_timm.py``; the table:
``benchmarks/conformance_timm.py``).

What fails today is marked ``xfail(strict=True)`` with the reason, raised as :class:`KnownGap`
only when the outcome is the known one: a fix flips the test (XPASS fails), a different failure
fails it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import timm_cases as tc

import graphopt
from graphopt.errors import GraphoptError, InternalError

pytestmark = pytest.mark.timeout(900)


class KnownGap(AssertionError):
    """The outcome a known gap of graphopt produces today (see the xfail reasons)."""


# model -> why it does not optimize today (a substring of the outcome's reason)
KNOWN_REFUSED: dict[str, str] = {}
# model -> why conv/linear+BN pairs are left in the optimized graph today (LeViT's
# Linear -> flatten(0, 1) -> BatchNorm1d and MixNet's BN after a concat of per-group convs fold
# since issue 17)
KNOWN_BN_LEFT: dict[str, str] = {}
# model -> "<pass>: why" it is rolled back today
KNOWN_ROLLED_BACK: dict[str, str] = {}
# model -> why it does not collapse as far as timm's reparameterize_model today
KNOWN_REPARAM: dict[str, str] = {}
# model -> why its ONNX path (tc.ONNX_CASES, slow) fails today
KNOWN_ONNX: dict[str, str] = {}


def _params(names, known: dict[str, str], fast=tc.FAST):
    for name in names:
        marks = [] if name in fast else [pytest.mark.slow]
        if name in known:
            marks.append(pytest.mark.xfail(strict=True, raises=KnownGap, reason=known[name]))
        yield pytest.param(name, id=name, marks=marks)


@functools.cache
def _outcome(timm, name: str, onnx_dir: Path | None = None) -> tc.Outcome:
    """One optimize() run per model and path, shared by the tests of this module."""
    return tc.run_case(timm, tc.case(name), onnx_dir)


def _check(outcome: tc.Outcome, known: str | None) -> None:
    """The outcome is ok; a refusal is a GraphoptError with a clear message; never a crash."""
    assert outcome.status != "failed", f"{outcome.case}: {outcome.reason} ({outcome.error})"
    if outcome.status == "refused":
        assert len(outcome.reason.split(": ", 1)[-1]) > 20, f"unclear refusal: {outcome.reason}"
        if known is not None and known in outcome.reason:
            raise KnownGap(outcome.reason)
    assert outcome.status == "ok", f"{outcome.case}: {outcome.status}: {outcome.reason}"
    assert outcome.report.artifact_error.ok, outcome.error


def test_the_list_covers_sixty_families():
    families = {c.family.split(" ")[0] for c in tc.CASES}
    assert len(tc.CASES) >= 60 and len(families) >= 60, (len(tc.CASES), len(families))
    assert set(tc.FAST) <= {c.name for c in tc.CASES}


def test_random_batchnorm_is_not_identity(timm):
    model, _ = tc.build(timm, tc.case("resnet10t"))
    bn = next(m for m in model.modules() if isinstance(m, tc.nn.BatchNorm2d))
    assert bn.running_mean.abs().min() > 0 and (bn.running_var - 1).abs().min() > 0
    assert (bn.weight - 1).abs().min() > 0 and bn.bias.abs().min() > 0


class _ConvBN(tc.nn.Module):
    def __init__(self, shortcut: bool = False, guard: bool = False):
        super().__init__()
        self.conv, self.bn = tc.nn.Conv2d(3, 4, 3), tc.nn.BatchNorm2d(4)
        self.shortcut, self.guard = shortcut, guard

    def forward(self, x):
        y = self.conv(x)
        if self.guard:
            tc.torch._assert(y.ndim == 4, "expected a 4D input")
        return self.bn(y) + (y if self.shortcut else 0)


@pytest.mark.parametrize(
    ("model", "left"),
    [(_ConvBN(), 1), (_ConvBN(guard=True), 1), (_ConvBN(shortcut=True), 0)],
    ids=["pair", "pair-with-guard", "conv-output-used-elsewhere"],
)
def test_the_pair_counter_sees_pairs_through_guards_only(model, left):
    """The conv+BN check is not vacuous: a pair counts (a guard is no real user); a conv whose
    output has another real user is no pair."""
    assert tc.conv_bn_left(tc.fx.symbolic_trace(model)) == left


@pytest.mark.parametrize("name", _params([c.name for c in tc.CASES], KNOWN_REFUSED))
def test_optimize_within_the_exact_contract(timm, name):
    _check(_outcome(timm, name), KNOWN_REFUSED.get(name))


@pytest.mark.parametrize("name", _params([c.name for c in tc.CASES], KNOWN_BN_LEFT))
def test_every_conv_bn_pair_is_folded(timm, name):
    """On timm's models every BatchNorm right after a conv or linear (through reshapes) is
    folded: guards such as ``_assert`` are not real users of the conv's output. (A
    pre-activation BN, after a concat or an add, has no layer to fold into and stays.)"""
    outcome = _outcome(timm, name)
    if outcome.status != "ok":
        pytest.skip(f"optimize() did not return: {outcome.reason}")
    if outcome.conv_bn_left and name in KNOWN_BN_LEFT:
        raise KnownGap(f"{outcome.conv_bn_left} conv/linear+BN pair(s) left")
    assert outcome.conv_bn_left == 0, (outcome.conv_bn_left, outcome.report.ops_after)


@pytest.mark.parametrize("name", _params([c.name for c in tc.CASES], KNOWN_ROLLED_BACK))
def test_no_pass_is_rolled_back(timm, name):
    """Every pass of the default pipeline runs to the end on the model (a pass that fails its
    check is rolled back and optimize() goes on: the artifact is right, the rewrite is lost)."""
    outcome = _outcome(timm, name)
    if outcome.status != "ok":
        pytest.skip(f"optimize() did not return: {outcome.reason}")
    known = KNOWN_ROLLED_BACK.get(name)
    if outcome.rolled_back and known and known.split(":")[0] in outcome.rolled_back:
        raise KnownGap(f"rolled back: {outcome.rolled_back}")
    assert not outcome.rolled_back, [r.message for r in outcome.report.rolled_back]


@pytest.mark.parametrize("name", _params(tc.REPARAM, KNOWN_REPARAM, fast=("repvgg_a0",)))
def test_reparameterizable_families_collapse_as_far_as_timm(timm, name):
    """graphopt's optimized graph has no more convs than timm's ``reparameterize_model``'s
    deploy model, and both compute the original's numbers within the exact contract."""
    outcome = _outcome(timm, name)
    _check(outcome, None)
    timm_side = tc.reparam_check(timm, tc.case(name), outcome)
    assert timm_side["timm_error"].ok, timm_side["timm_error"].describe()
    ours = tc.conv_count(outcome.report.ops_after)
    if ours > timm_side["timm_convs"] and name in KNOWN_REPARAM:
        raise KnownGap(f"{ours} convs left, timm's deploy model has {timm_side['timm_convs']}")
    assert ours <= timm_side["timm_convs"], (ours, timm_side, outcome.report.ops_after)


@pytest.mark.parametrize("name", _params(tc.ONNX_CASES, KNOWN_ONNX, fast=("resnet10t",)))
def test_onnx_path_within_the_exact_contract(timm, name, tmp_path_factory):
    """The model exported by torch.onnx.export, then the .onnx file optimized."""
    outcome = _outcome(timm, name, tmp_path_factory.mktemp("onnx"))
    if outcome.status == "export-failed":
        pytest.skip(f"torch.onnx.export failed: {outcome.reason}")
    _check(outcome, KNOWN_ONNX.get(name))


def test_a_refusal_is_a_graphopt_error(timm):
    """The fast sibling of the refusal branch: a model optimize() cannot take (its example
    input of the wrong rank) is refused with a GraphoptError, recorded as such."""
    model, _ = tc.build(timm, tc.case("resnet10t"))
    with pytest.raises(GraphoptError) as info:
        graphopt.optimize(model, "cpu", example_inputs=(tc.torch.randn(3, 8),), measure=False)
    assert not isinstance(info.value, InternalError)
    assert "(3, 8)" in str(info.value) and "Pass inputs of the shape" in str(info.value)


# the vision transformers (issue 17): also lowered by TVM, untuned
TVM_CASES = (
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mobilevit_xxs",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", TVM_CASES)
def test_vision_transformers_compile_with_tvm_within_the_exact_contract(timm, name):
    """ViT, DeiT, Swin (window 2 at 64x64) and MobileViT (torch.export capture) through
    ``optimize(backend="tvm", trials=0)``: TVM compiles them at the example's shape and its
    artifact computes the model's numbers (20-50 s each, untuned)."""
    pytest.importorskip("tvm")
    model, inputs = tc.build(timm, tc.case(name))
    result = graphopt.optimize(
        model, "cpu", example_inputs=inputs, measure=False, backend="tvm", trials=0
    )
    assert result.report.backend == "tvm" and result.report.artifact_error.ok
    with tc.torch.no_grad():
        want = model(*inputs)
    error = tc.Rounding().compare([want], [result(*inputs)], tc.Numerics.exact())
    assert error.ok, error.describe()

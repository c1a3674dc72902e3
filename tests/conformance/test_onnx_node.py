"""ONNX's own backend node tests, run through graphopt's ONNX importer and through ``optimize()``.

The cases come from the generators the ``onnx`` package ships (``onnx.backend.test.case.node``):
each is a one-node model, its inputs and the expected outputs.  Every case whose node is an op in
graphopt's converter table (:data:`graphopt.frontends.onnx.SUPPORTED_OPS`) is run

* through import: ``import_onnx(model)`` and the GraphModule called on the inputs;
* through ``optimize(model, example_inputs=inputs, measure=False)``: the artifact run on them;

and compared with the expected outputs the way ONNX's backend test runner compares them (same
shape, same dtype, ``np.testing.assert_allclose`` with the case's rtol/atol -- 1e-3 / 1e-7 for
every node test -- and two bfloat16 ULPs for bfloat16 outputs).  A case may fail only with a clear
refusal: a :class:`GraphoptError` (not an internal error, a failed pass or a verification
mismatch) whose message names the op.  A wrong output or any other exception fails the test.

CI runs the import path for every op and the ``optimize()`` path for :data:`OPTIMIZE_IN_CI`
(ops with a module, a dtype rule or a shape value); the ``optimize()`` path of the other ops is
marked slow.  ``benchmarks/conformance_onnx_node.py`` runs the same cases and writes the per-op
table to ``benchmarks/results/onnx_node_tests.md``; ``pytest -s`` prints the counts per op.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, numpy_helper

from graphopt import optimize
from graphopt.errors import (
    GraphoptError,
    InputError,
    InternalError,
    PassError,
    VerificationError,
)
from graphopt.frontends.onnx import SUPPORTED_OPS, import_onnx, to_numpy

# The optimize() path in CI: ops that become modules (Conv, ConvTranspose, BN, Gemm, MatMul), the
# normalizations and pools, and ops that carry shape values (Reshape, Slice, Gather, Pad, ...); each of the rest has its
# optimize() path behind the slow marker (about a second a case), its import path in CI.
OPTIMIZE_IN_CI = frozenset(
    [
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "Gemm",
        "MatMul",
        "LayerNormalization",
        "MaxPool",
        "AveragePool",
        "Softmax",
        "Concat",
        "Split",
        "Reshape",
        "Slice",
        "Gather",
        "Pad",
        "Where",
        "Expand",
    ]
)
# Cases whose outputs are random draws (training-mode Dropout with a ratio > 0): ONNX Runtime's
# own backend test filters skip them too. They are compared only when graphopt converts them;
# left opaque (run by ONNX Runtime), or refused by optimize()'s verification, they count as
# refused.
RANDOM_CASES = frozenset(
    [
        "test_training_dropout",
        "test_training_dropout_default",
        "test_training_dropout_mask",
        "test_training_dropout_default_mask",
    ]
)
# Cases where ONNX Runtime (which runs opaque nodes and is the reference optimize() checks
# against) and ONNX's expected outputs disagree, so one path or the other must differ:
# Resize downsampling with align_corners at a fractional scale x size (ONNX's reference uses the
# fractional output width, ONNX Runtime the integer one; the node stays opaque since its scales
# are a graph input), and Attention's qk_matmul_output mode 2 with a causal mask (ONNX Runtime
# writes the lowest float where ONNX writes -inf). A wrong output on the ONNX Runtime side, or
# optimize()'s check failing against it, counts as refused, with this reason.
ORT_DISAGREES = {
    "test_resize_downsample_scales_linear_align_corners": "ONNX Runtime's output size differs",
    "test_resize_downsample_scales_cubic_align_corners": "ONNX Runtime's output size differs",
    "test_attention_4d_with_past_and_present_qk_matmul_bias_3d_mask_causal": "ORT: lowest, ONNX: -inf",
    "test_attention_4d_with_past_and_present_qk_matmul_bias_4d_mask_causal": "ORT: lowest, ONNX: -inf",
}
# Errors that are graphopt's own failures, never a refusal.
_NOT_A_REFUSAL = (InternalError, PassError, VerificationError)


@dataclass(frozen=True)
class Outcome:
    """What one case did on one path: ``pass``, ``refused`` (with the message) or ``fail``."""

    case: str
    op: str
    status: str
    detail: str = ""


@functools.cache
def node_cases() -> dict[str, list[Any]]:
    """ONNX's single-node backend test cases of the ops graphopt imports, by op type."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators compute their -inf cases as 1 / 0
        cases = node.collect_testcases()
    by_op: dict[str, list[Any]] = {op: [] for op in sorted(SUPPORTED_OPS)}
    seen: set[str] = set()
    for case in cases:
        nodes = case.model.graph.node
        if len(nodes) != 1 or nodes[0].domain not in ("", "ai.onnx") or case.name in seen:
            continue
        if nodes[0].op_type in by_op:
            seen.add(case.name)
            by_op[nodes[0].op_type].append(case)
    return by_op


def _array(value: Any) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.asarray(value)


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16" or array.dtype.name.startswith("float8"):
        bits = array.view(np.uint16 if array.dtype.itemsize == 2 else np.uint8).copy()
        return torch.from_numpy(bits).view(getattr(torch, array.dtype.name))
    return torch.from_numpy(np.array(array, copy=True))


def assert_like_onnx(got: Sequence[Any], expected: Sequence[np.ndarray], rtol: float, atol: float):
    """ONNX's backend runner's comparison (``Runner.assert_similar_outputs``): count, shape,
    dtype, then ``assert_allclose(rtol, atol)``; bfloat16 (and float8, which numpy cannot
    compare directly) are compared as float32, bfloat16 with rtol widened to two ULPs as the
    runner does."""
    assert len(got) == len(expected), f"{len(got)} outputs, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        g = to_numpy(g) if isinstance(g, torch.Tensor) else np.asarray(g)
        assert g.shape == e.shape, f"output {i}: shape {g.shape}, expected {e.shape}"
        if e.dtype == object:  # strings
            np.testing.assert_array_equal(g, e)
            continue
        assert g.dtype == e.dtype, f"output {i}: dtype {g.dtype}, expected {e.dtype}"
        tol = rtol
        if e.dtype.name == "bfloat16" or e.dtype.name.startswith("float8"):
            tol = max(rtol, 2**-6) if e.dtype.name == "bfloat16" else rtol
            g, e = g.astype(np.float32), e.astype(np.float32)
        np.testing.assert_allclose(g, e, rtol=tol, atol=atol, err_msg=f"output {i}")


def _outputs(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple | list) else [out]


def _via_import(model: Any, feeds: list[np.ndarray]) -> tuple[list[Any], dict[str, str]]:
    gm = import_onnx(model)
    with torch.no_grad():
        return _outputs(gm(*[_tensor(f) for f in feeds])), dict(gm.meta.get("onnx_opaque", {}))


def _via_optimize(model: Any, feeds: list[np.ndarray]) -> tuple[list[Any], dict[str, str]]:
    result = optimize(model, example_inputs=feeds, measure=False)
    opaque = result.graph_module.meta.get("onnx_opaque", {})
    return _outputs(result(*feeds)), dict(opaque)


PATHS: dict[str, Callable[[Any, list[np.ndarray]], tuple[list[Any], dict[str, str]]]] = {
    "import": _via_import,
    "optimize": _via_optimize,
}


def run_case(case: Any, path: str) -> Outcome:
    """Run one node test case through ``path`` ("import" or "optimize") and judge it."""
    op = case.model.graph.node[0].op_type
    feeds = [_array(f) for f in case.data_sets[0][0]]
    expected = [_array(e) for e in case.data_sets[0][1]]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, opaque = PATHS[path](case.model, feeds)
    except GraphoptError as exc:
        if isinstance(exc, VerificationError) and case.name in ORT_DISAGREES:
            return Outcome(case.name, op, "refused", f"ONNX Runtime disagrees with ONNX: {exc}")
        if isinstance(exc, VerificationError) and case.name in RANDOM_CASES:
            return Outcome(case.name, op, "refused", f"random outputs cannot be verified: {exc}")
        if reason := _refusal(exc, op):
            return Outcome(case.name, op, "refused", reason)
        return Outcome(case.name, op, "fail", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a raw exception is a failure, reported with its type
        return Outcome(case.name, op, "fail", f"raw {type(exc).__name__}: {exc}")
    if opaque and case.name in RANDOM_CASES:  # ONNX Runtime's draw is not the generator's
        return Outcome(case.name, op, "refused", "; ".join(opaque.values()))
    try:
        assert_like_onnx(got, expected, case.rtol, case.atol)
    except AssertionError as exc:
        if opaque and case.name in ORT_DISAGREES:  # ONNX Runtime ran it, as it computes it
            return Outcome(case.name, op, "refused", ORT_DISAGREES[case.name])
        return Outcome(case.name, op, "fail", f"wrong output: {str(exc).strip()[:300]}")
    if opaque:  # the converter refused; the node stayed an ONNX node (and ran correctly)
        return Outcome(case.name, op, "refused", "; ".join(opaque.values()))
    return Outcome(case.name, op, "pass")


def _refusal(exc: GraphoptError, op: str) -> str:
    """The reason, when ``exc`` is a clear refusal: a GraphoptError naming the op (not an
    internal error, a failed pass, a numeric mismatch or a converter's crash re-raised as a
    CaptureError), or optimize()'s refusal of example inputs it cannot check with (NaN/inf,
    empty tensors: ONNX's cases include such inputs on purpose). A BackendError from ONNX
    Runtime on the user's original model (no kernel for the op and dtype) names the op too."""
    message = str(exc)
    # the importer re-raises a converter's own crash as "Converting ONNX node ... failed"
    if isinstance(exc, _NOT_A_REFUSAL) or message.startswith("Converting ONNX node"):
        return ""
    if isinstance(exc, InputError) and message.startswith("example input"):
        return f"optimize() refuses the example inputs: {message}"
    if "cannot run the original ONNX model" in message:  # no reference: ORT lacks a kernel
        return message
    return message if op.lower() in message.lower() else ""


# --------------------------------------------------------------------------------------------
# the tests: one per op and path; the session summary prints the counts


_SUMMARY: dict[tuple[str, str], Counter] = {}


def _check_op(op: str, path: str) -> None:
    cases = node_cases()[op]
    if not cases:
        pytest.skip(f"onnx {op}: no single-node test in this onnx version")
    outcomes = [run_case(case, path) for case in cases]
    _SUMMARY[(op, path)] = Counter(o.status for o in outcomes)
    failures = [f"{o.case}: {o.detail}" for o in outcomes if o.status == "fail"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("op", sorted(SUPPORTED_OPS))
def test_node_tests_through_import(op: str) -> None:
    _check_op(op, "import")


# Known failures outside the importer, each with its cause (strict: the test says when fixed).
# (op, path) -> why its cases fail, as strict xfails; none today (a model ONNX Runtime cannot
# load or run, such as bfloat16 Range, is refused by optimize() with that reason)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _optimize_param(op: str) -> Any:
    marks = [] if op in OPTIMIZE_IN_CI else [pytest.mark.slow]
    if reason := KNOWN_FAILURES.get((op, "optimize")):
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(op, marks=marks)


@pytest.mark.parametrize("op", [_optimize_param(op) for op in sorted(SUPPORTED_OPS)])
def test_node_tests_through_optimize(op: str) -> None:
    _check_op(op, "optimize")


def test_every_supported_op_has_node_tests_and_most_pass_import() -> None:
    by_op = node_cases()
    assert sum(len(v) for v in by_op.values()) > 600, "ONNX's generators gave too few cases"
    outcomes = [run_case(c, "import") for op in ("Add", "Cast") for c in by_op[op]]
    assert all(o.status != "fail" for o in outcomes), [o for o in outcomes if o.status == "fail"]
    assert sum(o.status == "pass" for o in outcomes) >= 0.5 * len(outcomes)


@pytest.fixture(scope="module", autouse=True)
def _print_summary():
    yield
    if not _SUMMARY:
        return
    lines = ["", "ONNX node tests: op path  pass/refused/fail"]
    for (op, path), counts in sorted(_SUMMARY.items()):
        lines.append(f"  {op:<20} {path:<8} {counts['pass']}/{counts['refused']}/{counts['fail']}")
    total = sum(_SUMMARY.values(), Counter())
    lines.append(f"  total: {total['pass']} pass, {total['refused']} refused, {total['fail']} fail")
    print("\n".join(lines))

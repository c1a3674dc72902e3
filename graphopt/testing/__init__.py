"""Public helpers for unit-testing passes — graphopt's own tests use them, and so can yours.

    from graphopt.testing import assert_pass_preserves, random_cnns, run_pass, verify_rewrite

    def test_my_pass_keeps_numbers():
        assert_pass_preserves("my-pass", model, (x,))          # contract from the pass itself

    @given(random_cnns())
    def test_my_pass_on_random_cnns(case):
        assert_pass_preserves(MyPass(), case.model, case.inputs)

    def test_my_pass_rewrites():
        verify_rewrite("my-pass", Before(), Expected(), (x,))    # canonical IR equality

``assert_pass_preserves`` checks what a pass promises: the graph lints, the outputs stay within
the pass's declared :class:`Numerics` on the given inputs (and on a second batch size), and
``modified`` is honest (the graph changed exactly when the pass says so); with
``inference_mode=True`` it checks it all again with the pass run under
``torch.inference_mode()``. The helpers work when called under ``no_grad()`` or
``inference_mode()``.

``fuzz(seeds, pipeline)`` runs whole pipelines on random models of several families (float32,
float64, float16/bfloat16, an int64 input, in-place updates of the input, hooks, ONNX input)
and judges each on a fresh input of another batch size under the exact contract::

    report = fuzz(range(1000), "fold-conv-bn,reparameterize,eliminate-dead-code")
    assert not report.bad(), report.summary()    # each failure: seed, family, mode, repro

The parts: :mod:`~graphopt.testing.passes` (one pass), :mod:`~graphopt.testing.models` (small
models, random BatchNorm), :mod:`~graphopt.testing.cnn` and :mod:`~graphopt.testing.cnn_spec`
(random CNNs), :mod:`~graphopt.testing.fuzz_cases` (the fuzz models) and
:mod:`~graphopt.testing.fuzzing` (running and judging them).
"""

from __future__ import annotations

from graphopt.testing.cnn import CNNCase, random_cnn, random_cnns, sum_branches
from graphopt.testing.cnn_spec import BASIC_KINDS, EXTENDED_KINDS
from graphopt.testing.fuzz_cases import FAMILIES, FuzzCase, fuzz_case
from graphopt.testing.fuzzing import (
    FULL_EXACT_PIPELINE,
    FuzzFailure,
    FuzzReport,
    UnitCostBackend,
    check_case,
    fuzz,
)
from graphopt.testing.models import random_bn, random_input, randomize_bn, seeded, small_conv_net
from graphopt.testing.passes import assert_pass_preserves, run_pass, verify_rewrite

__all__ = [
    "BASIC_KINDS",
    "EXTENDED_KINDS",
    "CNNCase",
    "FAMILIES",
    "FULL_EXACT_PIPELINE",
    "FuzzCase",
    "FuzzFailure",
    "FuzzReport",
    "UnitCostBackend",
    "check_case",
    "fuzz",
    "fuzz_case",
    "assert_pass_preserves",
    "random_bn",
    "random_cnn",
    "random_cnns",
    "random_input",
    "randomize_bn",
    "run_pass",
    "seeded",
    "small_conv_net",
    "sum_branches",
    "verify_rewrite",
]

"""Unit tests of one pass: run it (:func:`run_pass`), check that it kept its numeric contract and
reported ``modified`` honestly (:func:`assert_pass_preserves`), and that it rewrote a Before
model into an Expected one (:func:`verify_rewrite`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from graphopt.core.numerics import compare, run_module
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.printing import canonical_ir, fingerprint, ir_diff
from graphopt.core.registry import get_pass
from graphopt.frontends.torch import annotate_shapes, capture


def _as_pass(p: str | Pass | type[Pass], options: dict[str, Any]) -> Pass:
    if isinstance(p, Pass):
        if options:
            raise TypeError("options go with a pass name or class, not an instance")
        return p
    cls = get_pass(p) if isinstance(p, str) else p
    return cls(**options)


def _as_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """A fresh captured graph (the model itself is never touched)."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        annotate_shapes(gm, example_inputs)
        return gm
    return capture(model, tuple(example_inputs)).graph


def run_pass(
    p: str | Pass | type[Pass],
    model: nn.Module,
    example_inputs: Sequence[Any],
    ctx: PassContext | None = None,
    **options: Any,
) -> tuple[fx.GraphModule, PassResult]:
    """Capture ``model``, run one pass on it (no verification) and return (graph, result)."""
    gm = _as_graph(model, example_inputs)
    result = _as_pass(p, options).run(gm, ctx or PassContext(sample_inputs=tuple(example_inputs)))
    result.graph.graph.lint()
    result.graph.recompile()
    return result.graph, result


def assert_pass_preserves(
    p: str | Pass | type[Pass],
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    more_inputs: Sequence[Sequence[Any]] = (),
    expect_modified: bool | None = None,
    ctx: PassContext | None = None,
    inference_mode: bool = False,
    **options: Any,
) -> PassResult:
    """Run pass ``p`` on ``model`` and assert that it kept its numeric contract.

    Checked on ``example_inputs`` and each of ``more_inputs`` (e.g. another batch size):
    outputs within the pass's ``numerics`` of the original model's outputs; ``modified`` true
    exactly when the graph (structure or weights) changed; ``expect_modified`` if given.
    ``inference_mode=True`` checks all of it a second time with the pass run under
    ``torch.inference_mode()`` (how most inference code runs), where it must also do what it
    did outside (same ``modified`` and statistics). Works when called under ``no_grad()`` or
    ``inference_mode()`` itself. Returns the pass result for further assertions on statistics.
    """
    if inference_mode and not torch.is_inference_mode_enabled():
        kwargs = dict(more_inputs=more_inputs, expect_modified=expect_modified, ctx=ctx)
        result = assert_pass_preserves(p, model, example_inputs, **kwargs, **options)
        with torch.inference_mode():
            again = assert_pass_preserves(p, model, example_inputs, **kwargs, **options)
        assert (again.modified, dict(again.stats)) == (result.modified, dict(result.stats)), (
            f"pass {p} did something else under torch.inference_mode(): modified="
            f"{again.modified}, stats {dict(again.stats)}; outside it: modified="
            f"{result.modified}, stats {dict(result.stats)}"
        )
        return result
    pass_ = _as_pass(p, options)
    inputs = tuple(example_inputs)
    before_gm = _as_graph(model, inputs)
    before_print = fingerprint(before_gm)
    reference_model = copy.deepcopy(model).eval()
    gm, result = run_pass(pass_, before_gm, inputs, ctx)
    changed = fingerprint(gm) != before_print
    assert result.modified == changed, (
        f"pass {pass_} reported modified={result.modified} but the graph "
        f"{'changed' if changed else 'did not change'}; stats: {dict(result.stats)}"
    )
    if expect_modified is not None:
        assert result.modified == expect_modified, (
            f"expected pass {pass_} to {'change' if expect_modified else 'leave'} the graph; "
            f"stats: {dict(result.stats)}\n{canonical_ir(gm)}"
        )
    for args in (inputs, *[tuple(m) for m in more_inputs]):
        ref = run_module(reference_model, args)
        out = run_module(gm, args)
        cmp = compare(ref, out, pass_.numerics)
        assert cmp.ok, (
            f"pass {pass_} broke its contract {pass_.numerics} on inputs of shape "
            f"{[tuple(a.shape) for a in args]}: {cmp.describe()}\n"
            f"stats: {dict(result.stats)}\n{canonical_ir(gm)}"
        )
    return result


def verify_rewrite(
    p: str | Pass | type[Pass],
    before: nn.Module,
    expected: nn.Module,
    example_inputs: Sequence[Any],
    *,
    inference_mode: bool = False,
    **options: Any,
) -> PassResult:
    """Assert that pass ``p`` turns ``before`` into ``expected`` (canonical IR, constants elided)
    and that the rewrite keeps the pass's numeric contract (``inference_mode``: see
    :func:`assert_pass_preserves`)."""
    result = assert_pass_preserves(
        p, before, example_inputs, inference_mode=inference_mode, **options
    )
    got = canonical_ir(result.graph)
    want = canonical_ir(_as_graph(expected, tuple(example_inputs)))
    assert got == want, "the rewrite differs from the expected graph:\n" + ir_diff(
        want, got
    ).replace("--- before", "--- expected").replace("+++ after", "+++ got")
    return result

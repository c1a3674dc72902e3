from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from graphopt.core.numerics import compare, flatten_outputs, run_module
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.frontends.torch import capture


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Pass tests run tiny models: a second intra-op thread only adds contention (on a loaded
    2-core machine a 15 us batch_norm took 1.3 ms with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_under(
    mode: Callable[[], Any],
    p: Pass,
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    ctx: Callable[[], PassContext] | None = None,
) -> PassResult:
    """Run pass ``p`` as a user under ``mode`` (``torch.inference_mode`` or ``torch.no_grad``)
    would, and check what it left.

    1. capture and pass both under ``mode``: the output keeps the pass's ``numerics``;
    2. captured normally, the pass under ``mode``: the rewritten graph stores no inference
       tensor and still runs forward and backward outside ``mode`` (it can be fine-tuned).

    ``ctx`` makes a fresh context per run (default: the inputs as samples). Returns the second
    run's result.
    """
    inputs = tuple(inputs)
    make_ctx = ctx or (lambda: PassContext(sample_inputs=inputs))
    want = run_module(model, inputs)
    with mode():
        gm = capture(model, inputs).graph
        result = p.run(gm, make_ctx())
        got = run_module(result.graph, inputs)
    cmp = compare(want, got, p.numerics)
    assert cmp.ok, f"{p} under {mode.__name__}: {cmp.describe()}; stats {dict(result.stats)}"

    gm = capture(model, inputs).graph
    with mode():
        result = p.run(gm, make_ctx())
    cmp = compare(want, run_module(result.graph, inputs), p.numerics)
    assert cmp.ok, f"{p} under {mode.__name__}: {cmp.describe()}; stats {dict(result.stats)}"
    stored = [
        name for name, t in result.graph.state_dict(keep_vars=True).items() if t.is_inference()
    ]
    assert not stored, f"{p} under {mode.__name__} stored inference tensors: {stored}"
    args = [a.clone().requires_grad_() if a.is_floating_point() else a for a in inputs]
    outs = [o for o in flatten_outputs(result.graph(*args)) if o.requires_grad]
    if outs:  # "Inference tensors cannot be saved for backward" if the pass stored one
        sum(o.sum() for o in outs).backward()
    return result


@pytest.fixture
def under_inference_mode() -> Callable[..., PassResult]:
    """``under_inference_mode(p, model, inputs, ctx=None)``: see :func:`_run_under`."""
    return lambda p, model, inputs, ctx=None: _run_under(
        torch.inference_mode, p, model, inputs, ctx
    )

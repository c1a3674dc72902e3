"""merge-convs: consecutive convolutions with nothing non-linear between them merged into one,
where the merged conv is measured faster on the target (exact mode of Kim et al., ICML 2023).

A *stretch* is a maximal run of convs ``c_1 .. c_L`` (module or functional, constant weights)
where each conv's output is used only by the next, plus residual bodies ``x + c_a(..c_b(x))``
whose convs all lie in the run (the add continues the stretch). Position ``p`` is the value
after conv ``p`` (after the add where a residual ends there), position 0 the stretch's input. A
span ``(i, j]`` -- convs ``i+1..j`` -- becomes one conv by :func:`graphopt.algebra.conv_merge.merge`
(float64, cast back to the graph's dtype)::

    k = k1 + (k2 - 1)*s1    s = s1*s2    p = p1 + p2*s1    W = W2 * W1    b = b2 + W2 . b1
    x + body(x)             -> +1 at the centre tap (the residual folded, the add removed)

A span must hold a residual body whole, or lie inside it; a span that is exactly a body is
timed both with the residual folded and with the add kept after the merged conv.

Every single conv and every mergeable span is timed on the target's backend
(``PassContext.backend``, default ONNX Runtime on ``PassContext.target``) as a one-conv model at
its real input shape (from ``tensor_meta``), with the residual add in the unit where the add
stays in the graph, so the sum over single convs is the stretch as it is now. All of a stretch's
units are timed interleaved in one run (``time_interleaved``), each median stored in the latency
cache under the unit's structure (conv hyper-parameters, shapes, dtype, backend, version,
settings): identical units are timed once and a second run measures nothing.

Stage 1 of the dynamic program (:func:`graphopt.algebra.merge_dp.plan_exact`) then splits each
stretch::

    T_opt(i, j) = min( T'(i, j),  min_{i<k<j} T_opt(i, k) + T'(k, j) )

with ``T' = T * min_speedup`` for merged spans, ``T' = T`` for single convs: a merged span is
chosen only when it beats every other split by the factor ``min_speedup`` (and strictly, ties
go to fewer merges), so the pass never makes a stretch slower on the target by its own
measurements. :func:`plan_stretch` decides from the numbers alone; :func:`apply` only mutates.

``PassResult.decisions`` holds one :class:`StretchPlan` per stretch: convs, the chosen spans,
predicted against unmerged latency, every candidate's latency and every refusal with its reason.

Statistics: ``merged-spans``, ``convs-removed``, ``residuals-folded``, ``timed-units``;
``skipped:<reason>`` per refused candidate span (``padding``, ``bias-at-padding``,
``residual-shape``, ``residual-centre``, ``kernel-size`` -- see :mod:`graphopt.algebra.conv_merge`)
and per stretch left as it is: ``not-faster`` (no merge measured faster), ``all-refused``
(every merge refused; nothing is timed), ``target-not-measurable`` (a phone without an RPC
device), ``no-shape`` (no ``tensor_meta``), ``dtype`` (not floating point); per conv
``padding-mode`` (not zero padding, never part of a stretch).

Not handled: activations between convs (exact mode keeps them; a stretch ends there), a conv
whose output has other users inside a stretch, residual bodies that contain another residual
or a non-conv op, BatchNorm between convs (run ``fold-conv-bn`` first), ConvTranspose,
non-zero padding modes and string padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx

from graphopt.backends.measure import UnitTimer, backend_for, cache_for, measurable
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.progress import Progress, current
from graphopt.core.registry import register_pass
from graphopt.errors import PipelineError
from graphopt.passes.merge_convs import depth, exact
from graphopt.passes.merge_convs.candidates import (
    Candidate,
    StretchPlan,
    candidates,
    folded_bodies,
)
from graphopt.passes.merge_convs.depth import (
    Chain,
    DepthPlan,
    importance_table,
    model_latency,
    plan_depth,
)
from graphopt.passes.merge_convs.exact import apply, plan_stretch
from graphopt.passes.merge_convs.importance import Importance
from graphopt.passes.merge_convs.stretches import (
    Stretch,
    activation_input,
    find_stretches,
    spec_of,
)

__all__ = [
    "Candidate",
    "Chain",
    "DepthPlan",
    "Importance",
    "MergeConvs",
    "Stretch",
    "StretchPlan",
    "activation_input",
    "apply",
    "candidates",
    "find_stretches",
    "folded_bodies",
    "importance_table",
    "model_latency",
    "plan_depth",
    "plan_stretch",
    "spec_of",
]


@register_pass
class MergeConvs(Pass):
    """Merge runs of convolutions with nothing non-linear between them where the merged conv is
    measured faster on the target (see the module docstring).

    >>> PassManager("fold-conv-bn,merge-convs{max_kernel=7}").run(gm, ctx)
    >>> print("\\n".join(map(str, result.decisions)))      # why each stretch merged or not
    """

    name = "merge-convs"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        max_kernel: int = 7  # merged kernels larger than this are refused (kernel-size)
        max_span: int = 4  # at most this many convs merged into one
        min_speedup: float = 1.05  # unmerged / merged latency needed to keep a merge
        runs: int = 30  # timed calls per unit
        max_time_s: float = 20.0  # time budget of one stretch's interleaved timing
        cache: bool = True  # reuse (and store) latencies in the on-disk cache
        progress: bool = False  # progress on stderr outside optimize(progress=True) too
        # depth compression (remove activations): a budget turns it on
        budget: float = 0.0  # the model's latency times this (0 < budget <= 1)
        budget_ms: float = 0.0  # or the model's latency in ms on the target
        importance_batches: int = 4  # calibration batches the importance is measured on
        resolution: int = 1000  # time bins of the budget in the dynamic program
        min_cosine: float = 0.5  # the declared contract of depth compression (output cosine)
        validate_rounds: int = 3  # plans measured whole; a miss re-plans under a smaller budget

    def __init__(
        self,
        options: Any = None,
        *,
        finetune: Callable[[fx.GraphModule], Any] | None = None,
        metric: Callable[[Callable[..., Any]], float] | None = None,
        **values: Any,
    ) -> None:
        super().__init__(options, **values)
        o = self.options
        if o.max_kernel < 1 or o.max_span < 2 or o.runs < 1 or o.min_speedup < 1.0:
            raise PipelineError(
                "merge-convs: max_kernel and runs must be >= 1, max_span >= 2 and "
                f"min_speedup >= 1.0; got {o}."
            )
        if not 0.0 <= o.budget <= 1.0 or o.budget_ms < 0 or (o.budget and o.budget_ms):
            raise PipelineError(
                "merge-convs: give budget as a fraction of the model's latency (0 < budget <= 1)"
                f" or budget_ms as a latency in ms, not both; got budget={o.budget}, "
                f"budget_ms={o.budget_ms}."
            )
        if o.importance_batches < 1 or o.resolution < 10:
            raise PipelineError(
                "merge-convs: importance_batches must be >= 1 and resolution >= 10; "
                f"got {o.importance_batches}, {o.resolution}."
            )
        self.finetune = finetune
        self.metric = metric
        if self.depth:
            self.numerics = Numerics.lossy("cosine", o.min_cosine)

    @property
    def depth(self) -> bool:
        """Depth compression (a budget given) rather than the exact mode."""
        return bool(self.options.budget or self.options.budget_ms)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        stretches, stats = find_stretches(gm, through_activations=self.depth)
        if not stretches:
            return PassResult(gm, modified=False, stats=+stats)
        backend = backend_for(ctx)
        if not measurable(backend):  # a phone is timed only through its RPC device
            stats["skipped:target-not-measurable"] += len(stretches)
            return PassResult(gm, modified=False, stats=+stats)
        cache = cache_for(ctx, backend) if opts.cache else None
        timer = UnitTimer(
            backend,
            cache,
            runs=opts.runs,
            max_time_s=opts.max_time_s,
            progress=opts.progress,
            name="merge-convs",
        )
        say = current()  # optimize(progress=True)'s; else the option decides
        if not say.enabled:
            say = Progress(opts.progress, prefix="merge-convs ")
        with say.active():
            if self.depth:
                return depth.run(
                    gm,
                    ctx,
                    stretches,
                    stats,
                    timer,
                    say,
                    opts,
                    metric=self.metric,
                    finetune=self.finetune,
                )
            return exact.run(gm, stretches, stats, timer, say, opts)

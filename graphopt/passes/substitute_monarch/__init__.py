"""substitute-monarch: dense Linear / 1x1 conv -> Monarch, block-diagonal or low-rank, kept per
layer only where it is measured faster on the target and within the error budget.

For a layer ``y = W x + c`` (``W``: ``n_out x n_in``) the candidates are, per Monarch block count
``b`` in ``nblocks`` (:mod:`graphopt.algebra.monarch` has the math and the closed-form projections)::

    monarch(b, r)      W ~ P_out R P L P_in      per-slice rank-r SVD           b*b*r*(p+s) params
    block-diagonal(b') W ~ diag(W_1 .. W_b')     keep the diagonal blocks       n_in*n_out/b'
    low-rank(k)        W ~ U V                   truncated SVD                  k*(n_in+n_out)

with ``b'`` and ``k`` chosen so the baselines have about the Monarch candidate's parameter count.
Each candidate's error is measured on the layer's own inputs (the calibration data, or the
sample inputs, run through the graph up to the layer) against the dense layer's outputs ``Y``::

    rel_error = ||Y^ - Y||_F / ||Y||_F          cosine distance = 1 - mean_rows cos(Y_i, Y^_i)

Candidates within ``max_error`` (of ``metric``) are timed with the dense layer on the target's
backend (``PassContext.backend``, default ONNX Runtime on ``PassContext.target``): each as a
one-layer model on the layer's real input shape (from the traced ``tensor_meta``), all of a
layer's units interleaved in one run (``time_interleaved``), each median stored in the latency
cache under the unit's structure (type, sizes, input shape, backend, version, session settings),
so identical layers are timed once and a second run measures nothing. The fastest candidate
whose speed-up over the dense layer is at least ``min_speedup`` (and that is strictly faster,
whatever the option says) replaces the layer: ``plan()`` decides from the numbers alone,
``apply()`` only mutates. ``PassResult.decisions`` lists per layer every candidate's error and
latency, the dense latency, and what was kept or why nothing was.

The projection is an initialisation (Dao et al. fine-tune after it): ``finetune`` (a constructor
argument or ``PassContext.finetune``) is called on the graph after a substitution.

Numerics: lossy; the end-to-end contract is ``cosine >= output_cosine`` on the sample inputs
(a loose guard against a broken rewrite; the per-layer budget is the real control).

Not substituted (counted as ``skipped:<reason>``): ``too-small`` (min(n_in, n_out) below
``min_features``), ``shared-weight`` (module called twice or its weight tied elsewhere),
``weight-not-constant`` (a functional linear whose weight is computed), ``not-pointwise`` (a 1x1
conv with stride, padding, dilation or groups), ``dtype`` (not float32/float64),
``no-smaller-candidate`` (no candidate has fewer parameters), ``over-error-budget``,
``not-faster``, ``not-reached`` (no calibration run reached the layer), ``no-calibration-data``
(neither calibration data nor sample inputs), ``target-not-measurable`` (a phone without an RPC
device). Not considered at all: kernels larger than 1x1, ConvTranspose, and Linear layers inside
modules that capture keeps as leaves (``nn.MultiheadAttention``'s projections, for one).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from graphopt.backends.measure import UnitTimer, backend_for, cache_for, measurable
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.progress import current
from graphopt.core.registry import register_pass
from graphopt.errors import PipelineError
from graphopt.fx.tensors import grad_enabled
from graphopt.passes.substitute_monarch.candidates import (
    candidates,
    dense_unit,
    errors,
    latencies,
)
from graphopt.passes.substitute_monarch.plan import Candidate, LayerPlan, decide, plan
from graphopt.passes.substitute_monarch.sites import (
    Site,
    apply,
    find_sites,
    record_inputs,
)

__all__ = [
    "Candidate",
    "LayerPlan",
    "SubstituteMonarch",
    "apply",
    "decide",
    "parse_nblocks",
    "plan",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# the pass


def parse_nblocks(text: str) -> list[int]:
    """``"4,8"`` -> ``[4, 8]``; raises :class:`PipelineError` on anything but positive ints."""
    try:
        values = [int(v) for v in str(text).replace("/", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise PipelineError(
            f"substitute-monarch: nblocks must be positive block counts separated by commas, "
            f'e.g. nblocks="4,8" (quoted in a pipeline string) or nblocks=4; got {text!r}.'
        )
    return sorted(set(values))


@register_pass
class SubstituteMonarch(Pass):
    """Replace dense Linear / 1x1 conv layers by Monarch, block-diagonal or low-rank layers where
    measured faster on the target and within the error budget (see the module docstring).

    >>> PassManager('substitute-monarch{nblocks="4,8",max_error=0.3}').run(gm, ctx)
    >>> SubstituteMonarch(max_error=0.5, finetune=train_a_little)   # the hook as an argument
    """

    name = "substitute-monarch"
    numerics = Numerics.lossy("cosine", 0.9)

    @dataclass(frozen=True)
    class Options:
        nblocks: str = "4,8"  # Monarch block counts to try; quote a list: nblocks="2,4,8"
        block_diagonal: bool = True  # also try block-diagonal of the same parameter count
        low_rank: bool = True  # also try low-rank of the same parameter count
        metric: Literal["rel_error", "cosine"] = "rel_error"  # cosine: 1 - mean row cosine
        max_error: float = 0.1  # per layer, of ``metric``, on the layers' calibration inputs
        min_speedup: float = 1.05  # dense / substitute latency needed to keep a substitute
        min_features: int = 256  # layers with min(n_in, n_out) below this are left alone
        output_cosine: float = 0.9  # the pass's end-to-end contract on the sample inputs
        calibration_rows: int = 2048  # input rows per layer used for the errors
        runs: int = 30  # timed calls per unit
        max_time_s: float = 20.0  # time budget of one layer's interleaved timing
        cache: bool = True  # reuse (and store) latencies in the on-disk cache

    def __init__(
        self,
        options: Any = None,
        *,
        finetune: Callable[[fx.GraphModule], Any] | None = None,
        **values: Any,
    ) -> None:
        super().__init__(options, **values)
        self.nblocks = parse_nblocks(self.options.nblocks)
        if self.options.max_error < 0 or self.options.calibration_rows < 1 or self.options.runs < 1:
            raise PipelineError(
                "substitute-monarch: max_error must be >= 0, calibration_rows and runs >= 1."
            )
        self.finetune = finetune
        self.numerics = Numerics.lossy("cosine", self.options.output_cosine)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        sites, stats = find_sites(gm, opts.min_features)
        if not sites:
            return PassResult(gm, modified=False, stats=+stats)
        batches = ctx.calibration_batches()
        if batches is None:  # no inputs: no error can be measured, so nothing may change
            stats["skipped:no-calibration-data"] += len(sites)
            return PassResult(gm, modified=False, stats=+stats)
        backend = backend_for(ctx)
        if not measurable(backend):
            stats["skipped:target-not-measurable"] += len(sites)
            return PassResult(gm, modified=False, stats=+stats)
        say = current()
        with say.phase("substitute-monarch: recording the layers' inputs"):
            rows, first_shapes = record_inputs(gm, sites, batches, opts.calibration_rows)
        cache = cache_for(ctx, backend) if opts.cache else None
        timer = UnitTimer(
            backend, cache, runs=opts.runs, max_time_s=opts.max_time_s, name="substitute-monarch"
        )
        layers, substitutes = [], []
        for site in say.track(sites, "substitute-monarch: fitting and timing", unit="layer"):
            say.note(site.name)
            layer, built = self._measure(site, rows.get(site.node), first_shapes, timer)
            layers.append(layer)
            substitutes.append(built)
        decided = plan(
            layers, metric=opts.metric, max_error=opts.max_error, min_speedup=opts.min_speedup
        )
        kept = 0
        for site, layer, built in zip(sites, decided, substitutes, strict=True):
            log.info("substitute-monarch: %s", layer)
            if layer.chosen is None:
                stats[f"skipped:{layer.reason}"] += 1
                continue
            apply(gm, site, built[layer.chosen.label])
            stats["kept"] += 1
            stats[f"kept:{layer.chosen.kind}"] += 1
            kept += 1
        stats["timed-units"] += timer.measured
        decisions: list[Any] = list(decided)
        if kept:
            gm.graph.lint()
            gm.recompile()
            finetune = self.finetune or ctx.finetune
            if finetune is not None:
                modes = {m: m.training for m in gm.modules()}
                with grad_enabled():
                    finetune(gm)
                for m, mode in modes.items():  # each as it was: eval BN stays eval
                    m.training = mode
                stats["finetuned"] += 1
                decisions.append(f"fine-tuned with {getattr(finetune, '__name__', finetune)!s}")
        return PassResult(gm, modified=kept > 0, stats=+stats, decisions=decisions)

    def _measure(
        self,
        site: Site,
        rows: torch.Tensor | None,
        first_shapes: dict[fx.Node, tuple[int, ...]],
        timer: UnitTimer,
    ) -> tuple[LayerPlan, dict[str, nn.Module]]:
        opts = self.options
        meta = site.input_node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else first_shapes.get(site.node, ())
        layer = LayerPlan(
            site.name,
            site.op,
            site.in_features,
            site.out_features,
            tuple(int(d) for d in shape),
            site.in_features * site.out_features,
        )
        if rows is None or not len(rows):  # the calibration runs never reached the layer
            layer.reason = "not-reached"
            return layer, {}
        built = candidates(site, self.nblocks, opts.block_diagonal, opts.low_rank)
        modules = {}
        for candidate, module in built:
            rel, cos = errors(site, rows, module)
            layer.candidates.append(
                dataclasses.replace(candidate, rel_error=rel, cosine_distance=cos)
            )
            modules[candidate.label] = module
        within = [c for c in layer.candidates if c.error(opts.metric) <= opts.max_error]
        if not within:
            return layer, modules
        units = {"dense": dense_unit(site), **{c.label: modules[c.label] for c in within}}
        timed = latencies(timer, units, layer.input_shape, site.weight.dtype)
        layer.dense_ms = timed["dense"].median_ms
        layer.candidates = [
            dataclasses.replace(c, latency_ms=timed[c.label].median_ms) if c.label in timed else c
            for c in layer.candidates
        ]
        return layer, modules

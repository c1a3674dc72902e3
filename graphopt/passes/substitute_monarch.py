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

import copy
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.backends.measure import Latency, UnitTimer, backend_for, cache_for, measurable
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.errors import PipelineError
from graphopt.nn import BlockDiagonalLinear, LowRankLinear, MonarchLinear, PointwiseConv
from graphopt.passes._tensors import grad_enabled

log = logging.getLogger(__name__)

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR_MODULES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
_UNIT_VERSION = "substitute-monarch/1"  # bump when a unit's exported form changes


# ------------------------------------------------------------------------------------------------
# what is decided: plain data, printable


@dataclass(frozen=True)
class Candidate:
    """One substitute of a layer: label, weight parameter count, errors and measured latency.

    ``rel_error``: ``||Y^ - Y|| / ||Y||`` on the calibration rows; ``cosine_distance``:
    ``1 - mean row cosine similarity``. ``latency_ms``: the median on the target, ``None`` when
    not timed (over the error budget).
    """

    label: str
    kind: str  # monarch | block-diagonal | low-rank
    params: int
    rel_error: float
    cosine_distance: float
    latency_ms: float | None = None

    def error(self, metric: str) -> float:
        return self.rel_error if metric == "rel_error" else self.cosine_distance


@dataclass
class LayerPlan:
    """The decision for one layer: its candidates with their numbers, and the one kept (if any).

    ``reason`` says why nothing was kept (empty when ``chosen`` is set).
    """

    layer: str
    op: str  # "Linear", "F.linear", "Conv2d(1x1)"
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]
    dense_params: int
    dense_ms: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        if self.chosen is None or not self.dense_ms or not self.chosen.latency_ms:
            return None
        return self.dense_ms / self.chosen.latency_ms

    def __str__(self) -> str:
        shape = "x".join(str(d) for d in self.input_shape)
        head = f"{self.layer} [{self.op} {self.in_features}->{self.out_features}, input {shape}]"
        dense = f"{self.dense_ms:.3f} ms" if self.dense_ms is not None else "not timed"
        if self.chosen is not None:
            c = self.chosen
            verdict = (
                f"kept {c.label}: rel_error {c.rel_error:.3g}, 1-cos {c.cosine_distance:.3g}, "
                f"{dense} -> {c.latency_ms:.3f} ms ({self.speedup:.2f}x), "
                f"params {self.dense_params} -> {c.params}"
            )
        else:
            verdict = f"not kept ({self.reason}); dense {dense}"
        tried = "; ".join(
            f"{c.label} rel_error {c.rel_error:.3g} "
            + (f"{c.latency_ms:.3f} ms" if c.latency_ms is not None else "not timed")
            for c in self.candidates
        )
        return f"{head}: {verdict}" + (f"  [tried: {tried}]" if tried else "")


def decide(layer: LayerPlan, *, metric: str, max_error: float, min_speedup: float) -> LayerPlan:
    """Pick the kept candidate of ``layer`` from its numbers alone (pure; returns a copy).

    Kept: the fastest candidate with ``error(metric) <= max_error`` whose latency is measured,
    strictly below the dense layer's, and ``dense / latency >= min_speedup``. A candidate that
    is not measured faster is never kept, whatever ``min_speedup`` says.
    """
    if layer.reason:  # refused before anything was measured (e.g. never reached)
        return dataclasses.replace(layer, chosen=None)
    result = dataclasses.replace(layer, chosen=None, reason="")
    if not layer.candidates:
        result.reason = "no-smaller-candidate"
        return result
    within = [c for c in layer.candidates if c.error(metric) <= max_error]
    if not within:
        result.reason = "over-error-budget"
        return result
    timed = [c for c in within if c.latency_ms is not None]
    if layer.dense_ms is None or not timed:
        result.reason = "not-measured"
        return result
    faster = [
        c
        for c in timed
        if c.latency_ms < layer.dense_ms and layer.dense_ms / c.latency_ms >= min_speedup
    ]
    if not faster:
        result.reason = "not-faster"
        return result
    result.chosen = min(faster, key=lambda c: (c.latency_ms, c.error(metric)))
    return result


def plan(
    layers: Sequence[LayerPlan], *, metric: str, max_error: float, min_speedup: float
) -> list[LayerPlan]:
    """:func:`decide` for every layer (layers are independent: each keeps or not on its own)."""
    return [
        decide(layer, metric=metric, max_error=max_error, min_speedup=min_speedup)
        for layer in layers
    ]


# ------------------------------------------------------------------------------------------------
# finding layers


@dataclass
class _Site:
    node: fx.Node
    name: str
    op: str
    weight: torch.Tensor  # (n_out, n_in)
    bias: torch.Tensor | None
    input_node: fx.Node
    module: nn.Module | None = None  # call_module layers
    spatial_dims: int = 0  # 1x1 convs: how many spatial axes follow the channels
    attr_nodes: tuple[fx.Node, ...] = ()  # functional linear: its get_attr inputs

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _find_sites(gm: fx.GraphModule, min_features: int) -> tuple[list[_Site], Counter]:
    """The Linear / 1x1 conv layers worth trying, and the refusals of the others by reason."""
    stats: Counter = Counter()
    sites: list[_Site] = []
    calls: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[id(gm.get_submodule(node.target))] += 1
    names: Counter = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
    owners: Counter = Counter()
    for module in {id(m): m for m in gm.modules()}.values():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            owners[id(t)] += 1
    reads: Counter = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    counted: set[int] = set()
    for node in gm.graph.nodes:
        site, reason = _as_site(gm, node)
        if site is None and not reason:
            continue
        if reason:
            stats[f"skipped:{reason}"] += 1
            continue
        if site.module is not None:
            tensors = [t for t in (site.module.weight, site.module.bias) if t is not None]
            shared = (
                calls[id(site.module)] > 1
                or names[id(site.module)] > 1
                or any(owners[id(t)] > 1 for t in tensors)
            )
        else:
            shared = any(len(n.users) > 1 or reads[n.target] > 1 for n in site.attr_nodes)
        if shared:  # one weight, several uses: substituting it would change all of them
            if site.module is None or id(site.module) not in counted:  # once per layer
                stats["skipped:shared-weight"] += 1
                counted.add(id(site.module))
        elif site.weight.dtype not in (torch.float32, torch.float64):
            stats["skipped:dtype"] += 1
        elif min(site.in_features, site.out_features) < min_features:
            stats["skipped:too-small"] += 1
        else:
            sites.append(site)
    return sites, stats


def _as_site(gm: fx.GraphModule, node: fx.Node) -> tuple[_Site | None, str]:
    """(site, "") for a candidate layer, (None, reason) for a refused one, (None, "") else."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) in _LINEAR_MODULES:  # subclasses may override forward (LoRA...)
            return _Site(node, node.target, "Linear", m.weight, m.bias, node.args[0], m), ""
        if type(m) in _CONV_MODULES and all(k == 1 for k in m.kernel_size):
            pointwise = (
                all(v == 1 for v in m.stride)
                and all(v == 1 for v in m.dilation)
                and m.groups == 1
                and not isinstance(m.padding, str)
                and all(v == 0 for v in m.padding)
            )
            if not pointwise:  # stride / padding / groups: not one matrix on every pixel
                return None, "not-pointwise"
            d = len(m.kernel_size)
            weight = m.weight.reshape(m.out_channels, m.in_channels)
            return (
                _Site(node, node.target, f"{type(m).__name__}(1x1)", weight, m.bias,
                      node.args[0], m, spatial_dims=d),
                "",
            )  # fmt: skip
        return None, ""
    if node.op != "call_function" or node.target not in _LINEAR_FUNCTIONS:
        return None, ""
    values = dict(zip(("input", "weight", "bias"), node.args, strict=False))
    values.update(node.kwargs)
    weight_node, bias_node = values.get("weight"), values.get("bias")
    attr_nodes = tuple(n for n in (weight_node, bias_node) if isinstance(n, fx.Node))
    if not isinstance(weight_node, fx.Node) or any(n.op != "get_attr" for n in attr_nodes):
        return None, "weight-not-constant"
    weight = _fetch(gm, weight_node.target)
    bias = _fetch(gm, bias_node.target) if isinstance(bias_node, fx.Node) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None, "weight-not-constant"
    return (
        _Site(node, node.name, "F.linear", weight, bias, values["input"], attr_nodes=attr_nodes),
        "",
    )


# ------------------------------------------------------------------------------------------------
# the layers' inputs, by running the graph


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps (up to ``rows`` rows of) each site's input, channels last."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[_Site], rows: int) -> None:
        super().__init__(gm)
        self.sites = {s.node: s for s in sites}
        self.rows = rows
        self.seen: dict[fx.Node, list[torch.Tensor]] = {s.node: [] for s in sites}
        self.count: Counter = Counter()
        self.first_shape: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        site = self.sites.get(n)
        if site is not None and self.count[n] < self.rows and site.input_node in self.env:
            x = self.env[site.input_node].detach()
            self.first_shape.setdefault(n, tuple(x.shape))
            if site.spatial_dims:
                x = x.movedim(1, -1)
            flat = x.reshape(-1, site.in_features)[: self.rows - self.count[n]]
            self.seen[n].append(flat.clone())
            self.count[n] += flat.shape[0]
        return super().run_node(n)

    def full(self) -> bool:
        return all(self.count[n] >= self.rows for n in self.sites)


def _batches(ctx: PassContext) -> Iterable[tuple[Any, ...]] | None:
    if ctx.calibration_data is not None:
        return (b if isinstance(b, tuple | list) else (b,) for b in ctx.calibration_data)
    if ctx.sample_inputs is not None:
        return [tuple(ctx.sample_inputs)]
    return None


# ------------------------------------------------------------------------------------------------
# candidates and their errors


def _candidates(
    site: _Site, nblocks: Sequence[int], block_diagonal: bool, low_rank: bool
) -> list[tuple[Candidate, nn.Module]]:
    """Projected substitutes with fewer weight parameters than the dense layer (errors unset)."""
    n_in, n_out = site.in_features, site.out_features
    dense = n_in * n_out
    weight, bias = site.weight.detach(), None if site.bias is None else site.bias.detach()
    out: dict[str, tuple[str, nn.Module]] = {}
    for b in nblocks:
        if b > min(n_in, n_out):
            continue
        mon = MonarchLinear.from_dense(weight, bias, nblocks=b)
        params = mon.blocks1.numel() + mon.blocks2.numel()
        if params >= dense:
            continue
        out.setdefault(f"monarch(b={b},r={mon.rank})", ("monarch", mon))
        if block_diagonal:
            b2 = min(max(2, round(dense / params)), min(n_in, n_out))
            out.setdefault(
                f"block-diagonal(b={b2})",
                ("block-diagonal", BlockDiagonalLinear.from_dense(weight, bias, nblocks=b2)),
            )
        if low_rank:
            k = max(1, round(params / (n_in + n_out)))
            if k * (n_in + n_out) < dense and k < min(n_in, n_out):
                out.setdefault(
                    f"low-rank(r={k})", ("low-rank", LowRankLinear.from_dense(weight, bias, rank=k))
                )
    result = []
    for label, (kind, module) in out.items():
        module.eval().requires_grad_(False)
        if site.spatial_dims:
            module = PointwiseConv(module, site.spatial_dims).eval()
        params = sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))
        result.append((Candidate(label, kind, params, math.nan, math.nan), module))
    return result


def _errors(site: _Site, rows: torch.Tensor, module: nn.Module) -> tuple[float, float]:
    """(rel_error, 1 - mean row cosine) of ``module`` against the dense layer on ``rows``."""
    layer = module.layer if isinstance(module, PointwiseConv) else module
    x = rows.to(site.weight.dtype)
    with torch.no_grad():
        want = F.linear(x, site.weight, site.bias).double()
        got = layer(x).double()
    norm = float(want.norm())
    rel = float((got - want).norm()) / norm if norm > 0 else float((got - want).norm())
    cos = F.cosine_similarity(got, want, dim=1, eps=1e-12)
    return rel, float(1.0 - cos.mean())


def _dense_unit(site: _Site) -> nn.Module:
    """The dense layer alone, as the backend will time it."""
    bias = site.bias is not None
    if site.spatial_dims:
        conv = _CONV_MODULES[site.spatial_dims - 1]
        unit = conv(site.in_features, site.out_features, 1, bias=bias, dtype=site.weight.dtype)
        weight = site.weight.reshape(*site.weight.shape, *([1] * site.spatial_dims))
    else:
        unit = nn.Linear(site.in_features, site.out_features, bias=bias, dtype=site.weight.dtype)
        weight = site.weight
    with torch.no_grad():
        unit.weight.copy_(weight)
        if bias:
            unit.bias.copy_(site.bias)
    return unit.eval()


# ------------------------------------------------------------------------------------------------
# measuring on the target


def _latencies(
    timer: UnitTimer, units: dict[str, nn.Module], shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, Latency]:
    """``{label: latency}`` of one layer's units, each timed on an input of ``shape``."""
    keys = {
        label: timer.key(
            unit=_UNIT_VERSION, module=repr(module), shape=list(shape), dtype=str(dtype)
        )
        for label, module in units.items()
    }
    return timer.latencies({label: (m, [shape]) for label, m in units.items()}, dtype, keys)


# ------------------------------------------------------------------------------------------------
# rewriting


def apply(gm: fx.GraphModule, site: _Site, module: nn.Module) -> None:
    """Put ``module`` in place of the layer at ``site`` (the only mutation of the pass).

    The substitute trains like the layer it replaces (``requires_grad``, train/eval mode), so a
    fine-tuning hook sees it as a normal part of the graph.
    """
    training = site.module.training if site.module is not None else gm.training
    module.requires_grad_(site.weight.requires_grad).train(training)
    if site.module is not None:
        *path, name = site.node.target.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        setattr(owner, name, module)
        return
    base = f"{site.node.name}_substitute"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_module(name, (site.input_node,))
    new.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(new)
    gm.graph.erase_node(site.node)
    for attr in site.attr_nodes:
        if not attr.users:
            gm.graph.erase_node(attr)
            *path, leaf = attr.target.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, leaf)


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
        sites, stats = _find_sites(gm, opts.min_features)
        if not sites:
            return PassResult(gm, modified=False, stats=+stats)
        batches = _batches(ctx)
        if batches is None:  # no inputs: no error can be measured, so nothing may change
            stats["skipped:no-calibration-data"] += len(sites)
            return PassResult(gm, modified=False, stats=+stats)
        backend = backend_for(ctx)
        if not measurable(backend):
            stats["skipped:target-not-measurable"] += len(sites)
            return PassResult(gm, modified=False, stats=+stats)
        rows, first_shapes = _record(gm, sites, batches, opts.calibration_rows)
        cache = cache_for(ctx, backend) if opts.cache else None
        timer = UnitTimer(backend, cache, runs=opts.runs, max_time_s=opts.max_time_s)
        layers, substitutes = [], []
        for site in sites:
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
        site: _Site,
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
        built = _candidates(site, self.nblocks, opts.block_diagonal, opts.low_rank)
        modules = {}
        for candidate, module in built:
            rel, cos = _errors(site, rows, module)
            layer.candidates.append(
                dataclasses.replace(candidate, rel_error=rel, cosine_distance=cos)
            )
            modules[candidate.label] = module
        within = [c for c in layer.candidates if c.error(opts.metric) <= opts.max_error]
        if not within:
            return layer, modules
        units = {"dense": _dense_unit(site), **{c.label: modules[c.label] for c in within}}
        latencies = _latencies(timer, units, layer.input_shape, site.weight.dtype)
        layer.dense_ms = latencies["dense"].median_ms
        layer.candidates = [
            dataclasses.replace(c, latency_ms=latencies[c.label].median_ms)
            if c.label in latencies
            else c
            for c in layer.candidates
        ]
        return layer, modules


def _record(
    gm: fx.GraphModule, sites: Sequence[_Site], batches: Iterable[tuple[Any, ...]], rows: int
) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, tuple[int, ...]]]:
    recorder = _Recorder(gm, sites, rows)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
            if recorder.full():
                break
    found = {n: torch.cat(parts) for n, parts in recorder.seen.items() if parts}
    return found, recorder.first_shape


def substitute(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    calibration_data: Iterable[Any] | None = None,
    target: str = "cpu",
    finetune: Callable[[fx.GraphModule], Any] | None = None,
    **options: Any,
) -> tuple[fx.GraphModule, PassResult]:
    """Capture ``model`` and run ``substitute-monarch`` on it alone: (graph, result).

    A convenience for scripts and notebooks; in a pipeline, use the pass name. The model passed
    in is not modified.

    >>> gm, result = substitute(model, (x,), max_error=0.5, nblocks="4")
    >>> print("\\n".join(map(str, result.decisions)))
    """
    from graphopt.frontends.torch import capture
    from graphopt.target import Target

    gm = capture(copy.deepcopy(model), tuple(example_inputs)).graph
    ctx = PassContext(
        sample_inputs=tuple(example_inputs),
        calibration_data=calibration_data,
        target=Target.parse(target),
    )
    result = SubstituteMonarch(finetune=finetune, **options).run(gm, ctx)
    return result.graph, result

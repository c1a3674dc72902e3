"""equalize-layers: cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization").

For ``y = L2(f(L1(x)))`` with ``f`` positively homogeneous per channel (``f(s x) = s f(x)`` for
``s > 0``: ReLU, LeakyReLU, PReLU, identity, max/avg pooling) and ``s_i > 0``::

    L1: W1[i, ...] /= s_i      b1[i] /= s_i        (output channel i of the first layer)
    L2: W2[:, i, ...] *= s_i                        (input channel i of the second layer)

leaves ``y`` unchanged. With ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``,
``s_i = sqrt(r1_i * r2_i) / r2_i`` makes both ranges ``sqrt(r1_i * r2_i)``: the per-channel
ranges of each weight move together, so a per-tensor int8 scale wastes less resolution on
channels much narrower than the widest. Channels with ``r1_i = 0`` or ``r2_i = 0`` keep
``s_i = 1``. Grouped and depthwise layers scale per channel: input channel ``i`` of a grouped
``L2`` is ``W2[o, i mod C/g]`` for the outputs ``o`` of group ``i div (C/g)``; a depthwise layer
between two others (MobileNet's 1x1 -> dw -> 1x1) is in two pairs, so the pass sweeps all pairs
until every scale is within ``tolerance`` of 1 (at most ``max_sweeps`` sweeps). A sweep applies
only the pairs that still move, so a second run changes nothing.

Layers: Conv1d/2d/3d (module or ``F.conv*``) after a Conv of the same rank, Linear after Linear.
Arithmetic is float64, cast back to the weight's dtype.

Not equalised (counted as ``skipped:<reason>``): an activation between the layers that is not
positively homogeneous, such as ReLU6 (``min(max(s x, 0), 6) != s min(max(x, 0), 6)`` once
``s x > 6``: the clip is at a fixed value), Hardswish, GELU, SiLU (``not-positive-homogeneous``);
a BatchNorm between the layers (``batchnorm-between``: run ``fold-conv-bn`` first); the first
layer's output (or the activation's) also used elsewhere, e.g. by a residual add
(``output-used-elsewhere``); channel counts or layouts that do not line up, such as Conv ->
Linear (``shape-mismatch``); ConvTranspose (``transposed``); weights shared with another layer
or a layer called twice (``shared-weight``); weights that are not constants
(``weight-not-constant``); a weight or bias of either layer that ``forward`` writes in place
(``written-in-place``: ``self.conv.weight.data.mul_(0.9).add_(0.05)``, through a view or a tensor
sharing the memory; ``W/s * 0.9 + 0.05`` is not ``(W * 0.9 + 0.05) / s``, so every later call
would differ; the in-place rule is :func:`graphopt.fx.effects.written_storages`). ReLU6 could be kept by moving its bound to ``6 / s_i`` per channel,
which no longer is a ReLU6; this pass does not do it.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.algebra.bn_fold import scale_input_channels
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.effects import shares_storage, written_storages
from graphopt.fx.layers import Layer, as_bn, as_layer, call_counts, is_shared, param_owners
from graphopt.fx.names import layer_path, set_attr
from graphopt.fx.tensors import as_parameter
from graphopt.fx.uses import sole_value_user, value_users

aten = torch.ops.aten

# f(s x) = s f(x) for s > 0, channel by channel
_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu,
    torch.relu,
    torch.relu_,
    aten.relu.default,
    aten.relu_.default,
    F.leaky_relu,
    aten.leaky_relu.default,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_"}


def channel_ranges(weight: torch.Tensor, axis: int, groups: int = 1) -> torch.Tensor:
    """Per-channel ``max|W|`` in float64: output channels (``axis=0``) or input channels
    (``axis=1``; a grouped layer's ``C = groups * W.shape[1]`` inputs, each read by its group)."""
    w = weight.detach().double().abs()
    if axis == 0:
        return w.reshape(w.shape[0], -1).amax(1)
    out, c_g = w.shape[0], w.shape[1]
    # [groups, out/g, c_g, taps] -> per (group, local input): max over outputs and taps
    r = w.reshape(groups, out // groups, c_g, -1).amax(dim=(1, 3))
    return r.reshape(groups * c_g)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s_i = sqrt(r1_i r2_i) / r2_i`` (1 where a range is 0)."""
    ok = (r1 > 0) & (r2 > 0)
    s = torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2))
    return torch.where(ok, s, torch.ones_like(s))


def range_spread(weight: torch.Tensor) -> float:
    """``max_i r_i / min_i r_i`` over the output channels with a non-zero range: 1 when all
    channels span the same range (what a per-tensor scale wants)."""
    r = channel_ranges(weight, 0)
    r = r[r > 0]
    return float(r.max() / r.min()) if r.numel() else 1.0


@dataclass
class _Pair:
    first: Layer
    second: Layer
    between: list[fx.Node]  # the homogeneous ops between them

    @property
    def label(self) -> str:
        via = "".join(f" -> {layer_path(n)}" for n in self.between)
        return f"{layer_path(self.first.node)}{via} -> {layer_path(self.second.node)}"


@dataclass
class Equalized:
    """One pair of layers equalised: the channel range spreads of both before and after."""

    pair: str
    spread_before: tuple[float, float]
    spread_after: tuple[float, float]

    def __str__(self) -> str:
        b, a = self.spread_before, self.spread_after
        return (
            f"equalized {self.pair}: range spread {b[0]:.3g} -> {a[0]:.3g} (first), "
            f"{b[1]:.3g} -> {a[1]:.3g} (second)"
        )


@dataclass
class SpreadSummary:
    """The worst channel range spread over the equalised layers, before and after."""

    before: float
    after: float

    def __str__(self) -> str:
        return (
            "worst channel range spread of the equalized layers: "
            f"{self.before:.3g} -> {self.after:.3g}"
        )


@dataclass
class Refused:
    """A pair of layers left alone, and why."""

    pair: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"skipped {self.pair}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@register_pass
class EqualizeLayers(Pass):
    """Cross-layer equalisation of Conv/Linear pairs around positively homogeneous activations."""

    name = "equalize-layers"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        tolerance: float = 1e-3  # stop when every |s_i - 1| is below this
        max_sweeps: int = 100  # at most this many passes over the layer pairs

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        decisions: list = []
        pairs, refusals = find_pairs(gm)
        for r in refusals:
            stats[f"skipped:{r.reason}"] += 1
            decisions.append(r)
        # current float64 (weight, bias) per layer node: a layer in two pairs (the depthwise
        # conv of 1x1 -> dw -> 1x1) is one entry, so each pair sees the other's scaling
        layers: dict[fx.Node, Layer] = {}
        current: dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for p in pairs:
            for layer in (p.first, p.second):
                layers[layer.node] = layer
                bias = None if layer.bias is None else layer.bias.detach().double()
                current[layer.node] = (layer.weight.detach().double(), bias)
        before = [
            (range_spread(current[p.first.node][0]), range_spread(current[p.second.node][0]))
            for p in pairs
        ]
        moved = [False] * len(pairs)
        sweeps, converged = 0, not pairs
        while pairs and sweeps < self.options.max_sweeps:
            sweeps += 1
            applied = False
            for k, p in enumerate(pairs):
                (w1, b1), (w2, b2) = current[p.first.node], current[p.second.node]
                groups = p.second.groups
                s = equalization_scales(channel_ranges(w1, 0), channel_ranges(w2, 1, groups))
                if float((s - 1).abs().max()) < self.options.tolerance:
                    continue
                w1, b1, w2 = scale_pair(w1, b1, w2, s, groups)
                current[p.first.node] = (w1, b1)
                current[p.second.node] = (w2, b2)
                moved[k] = applied = True
            if not applied:
                converged = True
                break
        changed = {
            n for k, p in enumerate(pairs) if moved[k] for n in (p.first.node, p.second.node)
        }
        for node in changed:
            _store(gm, layers[node], *current[node])
        for k, p in enumerate(pairs):
            if moved[k]:
                stats["equalized"] += 1
                after = (
                    range_spread(current[p.first.node][0]),
                    range_spread(current[p.second.node][0]),
                )
                decisions.append(Equalized(p.label, before[k], after))
        if pairs:
            stats["sweeps"] = sweeps
        if changed:
            decisions.append(
                SpreadSummary(
                    max(max(b) for k, b in enumerate(before) if moved[k]),
                    max(range_spread(current[n][0]) for n in changed),
                )
            )
        if not converged:
            stats["not-converged"] += 1  # scales still moving after max_sweeps: not idempotent
        if changed:
            gm.recompile()
        return PassResult(gm, modified=bool(changed), stats=+stats, decisions=decisions)


# ------------------------------------------------------------------------------------------------
# finding pairs


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def _is_homogeneous(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Dropout):
            return not m.training  # identity in eval mode
        return isinstance(m, _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        if node.target is F.dropout:
            return (
                node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False
            )
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def _is_unary(node: fx.Node) -> bool:
    """An op reading one tensor (an elementwise activation, a pool): a candidate blocker."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    if node.op == "call_function" and node.target in (operator.getitem,):
        return False
    return len(node.all_input_nodes) == 1


def _first_input(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return arg if isinstance(arg, fx.Node) else None


def _leads_to_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    while True:
        if as_layer(gm, node, include_linear=True) is not None:
            return True
        if not _is_homogeneous(gm, node) or (user := sole_value_user(node)) is None:
            return False
        node = user


def find_pairs(gm: fx.GraphModule) -> tuple[list[_Pair], list[Refused]]:
    """Every ``layer -> homogeneous ops -> layer`` pair that can be equalised, and the refusals
    of pairs that look like one but cannot be."""
    pairs: list[_Pair] = []
    refusals: list[Refused] = []
    calls = call_counts(gm)
    owners = param_owners(gm)
    written = written_storages(gm)
    for node in gm.graph.nodes:
        first = as_layer(gm, node, include_linear=True)
        if first is None:
            continue
        cur, between = node, []
        while True:
            users = value_users(cur)  # reads of its shape (guards) are no users: kept by scaling
            if len(users) != 1:
                if len(users) > 1 and any(_leads_to_layer(gm, u) for u in users):
                    refusals.append(Refused(node.name, "output-used-elsewhere", cur.name))
                break
            user = users[0]
            second = as_layer(gm, user, include_linear=True)
            if second is not None:
                if second.input_node is not cur:
                    break  # the value is the weight or bias of the next layer, not its input
                pair = _Pair(first, second, between)
                if reason := _why_not(gm, pair, calls, owners, written):
                    refusals.append(Refused(pair.label, reason))
                else:
                    pairs.append(pair)
                break
            if _is_homogeneous(gm, user) and _first_input(user) is cur:
                between.append(user)
                cur = user
                continue
            nxt = value_users(user)
            if len(nxt) == 1 and _leads_to_layer(gm, nxt[0]):
                if as_bn(gm, user) is not None:
                    refusals.append(
                        Refused(node.name, "batchnorm-between", "run fold-conv-bn first")
                    )
                elif _is_unary(user):
                    refusals.append(
                        Refused(
                            f"{node.name} -> {user.name} -> {nxt[0].name}",
                            "not-positive-homogeneous",
                            f"{_op_name(gm, user)}(s*x) != s*{_op_name(gm, user)}(x)",
                        )
                    )
            break
    return pairs, refusals


def _why_not(
    gm: fx.GraphModule, pair: _Pair, calls: Counter, owners: Counter, written: set[int]
) -> str:
    a, b = pair.first, pair.second
    if not (a.constant and b.constant):
        return "weight-not-constant"
    # forward changes a weight in place: rescaled, its next values would not be the model's
    if shares_storage(written, a.weight, a.bias, b.weight, b.bias):
        return "written-in-place"
    if "convT" in (a.kind, b.kind):
        return "transposed"
    if is_shared(a, calls, owners) or is_shared(b, calls, owners):
        return "shared-weight"
    if a.kind != b.kind or a.weight.dim() != b.weight.dim():
        return "shape-mismatch"  # Conv -> Linear: the channel axis is not the feature axis
    if not (a.weight.is_floating_point() and b.weight.is_floating_point()):
        return "weight-not-constant"
    if a.weight.shape[0] != b.weight.shape[1] * b.groups:
        return "shape-mismatch"
    if a.bias is not None and a.bias.shape != (a.weight.shape[0],):
        return "shape-mismatch"
    return ""


# ------------------------------------------------------------------------------------------------
# scaling


def scale_pair(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, s: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``W1[i] / s_i``, ``b1[i] / s_i``, ``W2[:, i] * s_i`` (``groups``: the second layer's)."""
    tail = [1] * (w1.dim() - 1)
    w1 = w1 / s.reshape(-1, *tail)
    b1 = None if b1 is None else b1 / s
    return w1, b1, scale_input_channels(w2, s, groups)


def _store(
    gm: fx.GraphModule, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    _put(gm, layer, "weight", weight.to(layer.weight.dtype))
    if bias is not None:
        _put(gm, layer, "bias", bias.to(layer.bias.dtype))


def _put(gm: fx.GraphModule, layer: Layer, which: str, value: torch.Tensor) -> None:
    old = getattr(layer, which)
    if layer.module is not None:
        setattr(layer.module, which, as_parameter(value, old.requires_grad))
    else:
        set_attr(gm, getattr(layer, f"{which}_node").target, value)

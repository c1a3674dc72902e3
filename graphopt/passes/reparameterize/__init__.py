"""reparameterize: collapse linear structures into one convolution.

Structural re-parameterization as a graph rewrite: it recognises the *structure*, whatever the
modules are called. Two rules, applied until neither fires (run after ``fold-conv-bn``, which
leaves every conv+BN a conv with a bias):

**Sequential** (SESR collapsible blocks, DBB's 1x1 -> kxk): ``conv2(conv1(x))`` with nothing in
between and ``conv1``'s output used only there, when one of them is a 1x1 (stride 1, no padding,
one group)::

    kxk then 1x1:  W[o,i,taps] = sum_m W2[o,m] W1[m,i,taps]        b = W2 b1 + b2
    1x1 then kxk:  W[o,i,taps] = sum_m W2[o,m,taps] W1[m,i]        b = b2 + sum_{m,taps} W2 b1

The second is exact only where conv2 reads no zero padding of conv1's output (padding 0, a
non-zero padding mode, or ``b1 == 0``): a zero-padded border of ``conv1(x)`` is 0, not ``b1``
(``skipped:bias-at-padding``; DBB pads with BN's bias to dodge this). A merge that would cost
more multiply-adds per output than the two convs (a 1x1 bottleneck that reduces channels) is
left alone (``skipped:more-macs``).

**Affine around a Linear** (SLAB's re-parameterized BN in transformers): a per-feature affine
of the Linear's input or output -- ``x * c``, ``x + c``, ``x - c``, ``x / c`` with ``c`` a
constant scalar or a vector over the last dimension, or an eval BatchNorm1d applied between two
transposes of the last two dimensions (BN over the feature axis of ``(N, T, C)`` tokens) -- is
folded into the Linear: after it, ``W' = a W``, ``b' = a b + t``; before it, ``W' = W a``,
``b' = b + W t``.

**Parallel** (RepVGG, ACNet, MobileOne):

``y = sum_i B_i(x)`` where every ``B_i`` is, on the same ``x``,

- a convolution (module or functional; any kernel size, groups, dilation, zero padding) whose
  output feeds only this sum,
- an eval-mode BatchNorm of ``x`` (the identity-BN branch: a per-channel affine ``a*x + t``),
- ``x`` itself (a plain identity branch),

becomes one convolution. With ``K`` the largest kernel and each kernel zero-padded to ``K``
*centred* (so each branch keeps its alignment)::

    W = sum_i pad_K(W_i) + sum_identity a * I_K        b = sum_i b_i + sum_identity t

where ``I_K`` is the identity kernel (1 at the centre tap of output channel o's own input
channel, per group). Exact in exact arithmetic; computed in float64 and cast back.

Refused (``skipped:<reason>`` in the stats), never miscompiled: branches with different strides,
dilations, groups or channel counts (``mismatch``); kernels whose centres do not line up: the
offset ``padding - dilation*(k-1)/2`` must be the same integer for every branch and dimension
(``misaligned``); non-zero padding modes (``padding-mode``); an identity branch beside a strided
conv or with C_in != C_out (``identity-shape``); a merge that would move a read of ``x`` past
an in-place write to ``x`` or a view of it (``a = conv3(x); x.mul_(2); b = conv1(x)``:
``written-in-place``); a conv whose output is also used elsewhere or whose weights are not
constants (its branch is simply left out of the merge). In-place statements whose result is
unused (``v.mul_(s)``) are never dropped by the clean-up between sweeps.

Every rule leaves alone what ``forward`` writes in place (``written-in-place``, counted where a
merge was refused): a conv or Linear whose weight or bias, a BatchNorm whose statistics or affine
parameters, a per-channel constant (``* self.s``) whose value an in-place op changes
(``self.conv.weight.data.mul_(0.9)``, ``self.bn.running_mean.add_(d)``, through a view or a
tensor sharing the memory). Merged, every later call would use the values of the call before
the pass. In a sum, such a branch stays a term of its own and the others still merge. The
in-place rule (what writes, what aliases, which attributes) is :mod:`graphopt.fx.effects`'s
(:func:`~graphopt.fx.effects.written_storages`, :func:`~graphopt.fx.effects.may_alias_input`).

Merged layers get the model's dtype, rounded once from the float64 result (a float64 model is
merged at float64 precision), and normal parameters also under ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections import Counter

from torch import fx

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.effects import remove_dead_nodes
from graphopt.fx.layers import as_layer
from graphopt.fx.memo import RunMemo
from graphopt.passes.reparameterize import affine, concat, parallel, sequential

# One sweep, in this order; each rule can enable the others (SESR: kxk->1x1 merged, then + x).
RULES = (
    affine.CONV_RULE.apply,
    sequential.RULE.apply,
    affine.LINEAR_RULE.apply,
    concat.RULE.apply,
    parallel.apply,
)
_MERGES = ("collapsed", "collapsed-sequential", "folded-affine", "merged-concat", "merged-into-fc")


@register_pass
class Reparameterize(Pass):
    """Collapse linear structures (parallel branches, conv chains, affines, concatenations,
    conv branches beside an FC) into one layer: RepVGG, ACNet, DBB, MobileOne, FastViT, SESR,
    RepMLP, SLAB."""

    name = "reparameterize"
    numerics = Numerics.exact()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        # float64 weights and in-place facts, worked out once for this run and dropped with it
        stats = self._sweeps(gm, RunMemo(gm))
        modified = any(stats[k] for k in _MERGES)
        if modified:
            gm.delete_all_unused_submodules()
            gm.recompile()
        stats["convs"] = sum(
            1
            for n in gm.graph.nodes
            if (layer := as_layer(gm, n, include_linear=False)) is not None and layer.kind == "conv"
        )
        return PassResult(gm, modified=modified, stats=+stats)

    def _sweeps(self, gm: fx.GraphModule, memo: RunMemo) -> Counter:
        stats: Counter = Counter()
        while True:
            sweep: Counter = Counter()
            for rule in RULES:
                rule(gm, memo, sweep)
            if not any(sweep[k] for k in _MERGES):
                stats.update(sweep)  # the refusals of the last, fixed-point sweep
                return stats
            stats.update({k: v for k, v in sweep.items() if not k.startswith("skipped")})
            remove_dead_nodes(gm)  # the replaced sums (never collapse them again), not in-place ops

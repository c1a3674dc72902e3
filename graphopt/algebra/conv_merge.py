"""Exact merge of a chain of convolutions, with nothing non-linear between them, into one.

Conv ``a`` (``W1: [M, C/g1, k1..]``, ``b1``, stride ``s1``, padding ``p1``, dilation ``d1``)
followed by conv ``b`` (``W2: [O, M/g2, k2..]``, ``b2``, ``s2``, ``p2``, ``d2``) is, per spatial
dimension, the conv with taps at ``i*d2*s1 + j*d1`` (``i`` a tap of ``W2``, ``j`` one of
``W1``). With ``d = gcd`` of the steps that occur (``d1`` if ``k1 > 1``, ``d2*s1`` if ``k2 > 1``;
1 if neither)::

    dilation d     kernel K = ((k1-1)*d1 + (k2-1)*d2*s1) / d + 1    (= k1 + (k2-1)*s1 for d1 = d2 = 1)
    stride   s1*s2 padding  p1 + p2*s1                               (all padding moved to the input)
    W[o,c,(i*d2*s1 + j*d1)/d] += sum_m W2[o,m,i] * W1[m,c,j]
    b[o] = b2[o] + sum_{m,i} W2[o,m,i] * b1[m]

A chain is folded left to right, the merged prefix taking the place of ``a``. Output sizes agree
for every input size (``floor`` commutes with the stride product). Groups: the merged conv has
``G = gcd(g1, g2)`` groups (channel blocks of both convs nest in ``G`` super-blocks), so
depthwise o depthwise stays depthwise, equal groups stay grouped and anything else densifies.

Padding on the intermediate tensor (``p2 > 0``) is a ring of zeros around ``a(x)``. Moving it to
the input computes ``a`` on that ring instead, which is still zero -- so the merge is exact --
exactly when (per padded dimension) ``a``'s receptive field at the ring lies in ``x``'s zero
padding for every input size, ``p1 >= d1*(k1-1)`` (a 1x1 conv of any stride, a conv padded by
its full extent), **and** ``b1 == 0`` (otherwise the ring would read ``b1``). The first
failure refuses with ``padding``, the second with ``bias-at-padding`` (algorithms.md §3.2:
"merging is only exact if the network was trained with the padding moved to the first conv";
``move_padding=True`` moves it anyway, for depth compression, where the network is fine-tuned
afterwards; only the border of the output changes).

A residual ``x + chain(x)`` is folded as ``+1`` at the centre tap of channel ``o``'s own input
channel, when the merged conv keeps the shape: ``C == O``, stride 1, odd kernel, padding
``d*(K-1)/2`` (refused as ``residual-shape`` or ``residual-centre``).

Refusal reasons: ``padding``, ``bias-at-padding``, ``residual-shape``, ``residual-centre``,
``kernel-size`` (merged kernel above ``max_kernel``), ``groups`` (``densify=False`` and the chain
would lose its groups). Every
computation is in float64; there is no case that merges inexactly without ``move_padding``.

>>> a = ConvSpec(torch.randn(8, 4, 1, 1, dtype=torch.float64))            # 1x1, no bias
>>> b = ConvSpec(torch.randn(8, 8, 3, 3, dtype=torch.float64), padding=1)
>>> merged = merge([a, b])                 # a 3x3 conv, padding 1: b(a(x)) == merged(x)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import InputError

__all__ = ["ConvSpec", "Refusal", "dense_kernel", "merge", "merge_pair", "merge_specs", "regroup"]

_F64 = torch.float64
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_LAYER = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _ints(v: Any, dims: int, what: str) -> tuple[int, ...]:
    out = tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),) * dims
    if len(out) != dims:
        raise InputError(f"{what}={v!r} has {len(out)} entries; the kernel has {dims} dims")
    return out


@dataclass(frozen=True)
class ConvSpec:
    """A zero-padded convolution as plain values: ``weight [O, C/groups, k..]`` and ``bias [O]``
    in float64 (converted on construction; ``bias=None`` means zeros), stride, padding and
    dilation as one int or one per spatial dimension."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1

    def __post_init__(self) -> None:
        w = self.weight.detach().to(_F64)
        if w.dim() < 3:
            raise InputError(f"conv weight must be [O, C/g, k..]; got shape {tuple(w.shape)}")
        dims = w.dim() - 2
        b = torch.zeros(w.shape[0], dtype=_F64) if self.bias is None else self.bias
        b = b.detach().to(_F64).reshape(-1)
        if b.numel() != w.shape[0]:
            raise InputError(f"bias has {b.numel()} entries; the weight has {w.shape[0]} outputs")
        if self.groups < 1 or w.shape[0] % self.groups:
            raise InputError(f"groups={self.groups} does not divide {w.shape[0]} output channels")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        for name in ("stride", "padding", "dilation"):
            object.__setattr__(self, name, _ints(getattr(self, name), dims, name))

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def module(
        self, dtype: torch.dtype = torch.float32, padding: int | tuple[int, ...] | None = None
    ) -> nn.Module:
        """This conv as an ``nn.Conv1d/2d/3d`` with a bias, in ``dtype`` (``padding``: another
        padding than the spec's, e.g. 0 for a span whose padding moved to its input). The
        float64 weights are rounded once, to ``dtype``; the parameters are normal tensors even
        under ``torch.inference_mode()`` (the module can be fine-tuned)."""
        with torch.inference_mode(False), torch.no_grad():
            conv = _LAYER[self.dims](
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding if padding is None else padding,
                dilation=self.dilation,
                groups=self.groups,
                bias=True,
                dtype=dtype,
            )
            conv.weight.copy_(self.weight)
            conv.bias.copy_(self.bias)
        return conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the conv on ``x`` (float64 weights; ``x`` is converted to float64)."""
        conv = _CONV[self.dims]
        return conv(
            x.to(_F64),
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


@dataclass(frozen=True)
class Refusal:
    """Why a chain was not merged: ``reason`` is the stable key (``skipped:<reason>`` in pass
    statistics), ``detail`` says what was found, ``position`` is the index in the chain of the
    conv that could not be folded into the ones before it."""

    reason: str
    detail: str = ""
    position: int = 0

    def __str__(self) -> str:
        return f"{self.reason} (conv {self.position}): {self.detail}"


def dense_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped kernel [O, I/g, k..] as the equivalent dense one [O, I, k..]."""
    if groups == 1:
        return weight
    out, per_group = weight.shape[0], weight.shape[1]
    dense = weight.new_zeros((out, per_group * groups) + tuple(weight.shape[2:]))
    o_g = out // groups
    for g in range(groups):
        dense[g * o_g : (g + 1) * o_g, g * per_group : (g + 1) * per_group] = weight[
            g * o_g : (g + 1) * o_g
        ]
    return dense


def regroup(dense: torch.Tensor, groups: int) -> torch.Tensor | None:
    """A dense kernel [O, I, k..] as a ``groups``-grouped one [O, I/g, k..] if it is one."""
    if groups == 1:
        return dense
    out, inputs = dense.shape[:2]
    o_g, i_g = out // groups, inputs // groups
    grouped = torch.cat(
        [dense[g * o_g : (g + 1) * o_g, g * i_g : (g + 1) * i_g] for g in range(groups)]
    )
    return grouped if torch.equal(dense_kernel(grouped, groups), dense) else None


def _taps(k1: int, d1: int, k2: int, d2: int, s1: int) -> tuple[int, int, int, int]:
    """Per dimension: merged dilation ``d``, kernel ``K``, and the steps of conv 1's and conv 2's
    taps in units of ``d``."""
    steps = [s for s, k in ((d1, k1), (d2 * s1, k2)) if k > 1]
    d = math.gcd(*steps) if steps else 1
    step1, step2 = d1 // d if k1 > 1 else 1, d2 * s1 // d if k2 > 1 else 1
    return d, (k1 - 1) * step1 + (k2 - 1) * step2 + 1, step1, step2


def _super_blocks(weight: torch.Tensor, groups: int, big: int) -> torch.Tensor:
    """A ``groups``-grouped kernel as ``big`` dense diagonal blocks ``[big, O/big, I/big, k..]``
    (``big`` divides ``groups``)."""
    out = weight.shape[0] // big
    blocks = [dense_kernel(weight[g * out : (g + 1) * out], groups // big) for g in range(big)]
    return torch.stack(blocks)


def merge_pair(a: ConvSpec, b: ConvSpec, *, move_padding: bool = False) -> ConvSpec | Refusal:
    """``b(a(x))`` as one conv, or why not (see the module docstring)."""
    if a.dims != b.dims:
        raise InputError(f"cannot chain a {a.dims}-d conv into a {b.dims}-d conv")
    if a.out_channels != b.in_channels:
        raise InputError(
            f"conv with {a.out_channels} outputs feeds a conv with {b.in_channels} inputs"
        )
    if any(b.padding) and not move_padding:
        for k1, d1, p1, p2 in zip(a.kernel_size, a.dilation, a.padding, b.padding, strict=True):
            if p2 and p1 < d1 * (k1 - 1):
                return Refusal(
                    "padding",
                    f"the second conv pads by {p2}, the first (kernel {k1}, dilation {d1}) reads "
                    f"real input at that ring with padding {p1} < {d1 * (k1 - 1)}",
                )
        if torch.count_nonzero(a.bias):
            return Refusal(
                "bias-at-padding",
                "the second conv's zero padding would read the first conv's non-zero bias",
            )
    per_dim = [
        _taps(k1, d1, k2, d2, s1)
        for k1, d1, k2, d2, s1 in zip(
            a.kernel_size, a.dilation, b.kernel_size, b.dilation, a.stride, strict=True
        )
    ]
    big = math.gcd(a.groups, b.groups)
    w1 = _super_blocks(a.weight, a.groups, big)  # [G, M/G, C/G, k1..]
    w2 = _super_blocks(b.weight, b.groups, big)  # [G, O/G, M/G, k2..]
    # conv 1's taps spread to its step in the merged grid
    spread = [
        (k1 - 1) * step1 + 1 for k1, (_, _, step1, _) in zip(a.kernel_size, per_dim, strict=True)
    ]
    w1s = w1.new_zeros(w1.shape[:3] + tuple(spread))
    w1s[(...,) + tuple(slice(None, None, step1) for _, _, step1, _ in per_dim)] = w1
    merged = w1.new_zeros((big, w2.shape[1], w1.shape[2]) + tuple(K for _, K, _, _ in per_dim))
    for tap in itertools.product(*(range(k) for k in b.kernel_size)):
        at = tuple(
            slice(i * step2, i * step2 + n)
            for i, (_, _, _, step2), n in zip(tap, per_dim, spread, strict=True)
        )
        merged[(...,) + at] += torch.einsum("gom,gmc...->goc...", w2[(...,) + tap], w1s)
    bias = b.bias + torch.einsum(
        "gom,gm->go", w2.flatten(3).sum(-1), a.bias.reshape(big, -1)
    ).reshape(-1)
    return ConvSpec(
        merged.reshape((b.out_channels,) + tuple(merged.shape[2:])),
        bias,
        tuple(s1 * s2 for s1, s2 in zip(a.stride, b.stride, strict=True)),
        tuple(p1 + p2 * s1 for p1, p2, s1 in zip(a.padding, b.padding, a.stride, strict=True)),
        tuple(d for d, _, _, _ in per_dim),
        big,
    )


def _add_identity(spec: ConvSpec) -> ConvSpec | Refusal:
    if spec.in_channels != spec.out_channels or any(s != 1 for s in spec.stride):
        return Refusal(
            "residual-shape",
            f"x + f(x) needs C_in == C_out and stride 1; the merged conv maps "
            f"{spec.in_channels} -> {spec.out_channels} channels with stride {spec.stride}",
        )
    for k, d, p in zip(spec.kernel_size, spec.dilation, spec.padding, strict=True):
        if k % 2 == 0 or p != d * (k - 1) // 2:
            return Refusal(
                "residual-centre",
                f"the merged kernel {spec.kernel_size} (padding {spec.padding}, dilation "
                f"{spec.dilation}) has no centre tap aligned with x",
            )
    weight = spec.weight.clone()
    per_group = weight.shape[1]
    centre = tuple(k // 2 for k in spec.kernel_size)
    channels = torch.arange(spec.out_channels)
    weight[(channels, channels % per_group) + centre] += 1.0
    return ConvSpec(weight, spec.bias, spec.stride, spec.padding, spec.dilation, spec.groups)


def merge(
    chain: list[ConvSpec],
    residual: bool = False,
    *,
    move_padding: bool = False,
    max_kernel: int | None = None,
    densify: bool = True,
) -> ConvSpec | Refusal:
    """The convs of ``chain`` (applied first to last) as one conv; with ``residual``, the conv
    equal to ``x + chain(x)``. Returns a :class:`Refusal` where no single conv is exactly
    equal (see the module docstring); ``move_padding`` merges padded spans anyway, changing the
    border of the output (depth-compression mode).

    >>> dw = [ConvSpec(torch.randn(6, 1, 3, 3), groups=6) for _ in range(2)]
    >>> merge(dw).groups, merge(dw).kernel_size
    (6, (5, 5))
    """
    if not chain:
        raise InputError("merge() needs at least one conv")
    most_groups = max(c.groups for c in chain)
    merged = chain[0]
    for position, conv in enumerate(chain[1:], start=1):
        result = merge_pair(merged, conv, move_padding=move_padding)
        if isinstance(result, Refusal):
            return Refusal(result.reason, result.detail, position)
        merged = result
        if max_kernel is not None and max(merged.kernel_size) > max_kernel:
            return Refusal(
                "kernel-size",
                f"the merged kernel {merged.kernel_size} exceeds max_kernel={max_kernel}",
                position,
            )
    if not densify and merged.groups < most_groups:
        return Refusal(
            "groups",
            f"the merged conv has {merged.groups} groups; the chain has a conv with "
            f"{most_groups} (densify=False)",
            len(chain) - 1,
        )
    if residual:
        result = _add_identity(merged)
        if isinstance(result, Refusal):
            return Refusal(result.reason, result.detail, len(chain) - 1)
        merged = result
    return merged


def merge_specs(
    specs: list[ConvSpec],
    bodies: list[tuple[int, int]],
    max_kernel: int | None,
    move_padding: bool = False,
) -> ConvSpec | Refusal:
    """``specs`` (applied in order) as one conv, the residual ``bodies`` ``(a, b)`` -- convs
    ``a..b`` (0-based, whole) with ``x + body(x)`` around them -- folded in."""
    parts: list[ConvSpec] = []
    k = 0
    for a, b in sorted(bodies):
        parts.extend(specs[k:a])
        body = merge(
            specs[a : b + 1], residual=True, max_kernel=max_kernel, move_padding=move_padding
        )
        if isinstance(body, Refusal):
            return Refusal(body.reason, body.detail, body.position + a)
        parts.append(body)
        k = b + 1
    parts.extend(specs[k:])
    if len(parts) == 1:
        return parts[0]
    return merge(parts, max_kernel=max_kernel, move_padding=move_padding)

"""The spec of a random CNN: a list of layer dicts drawn one kind at a time.

:func:`build_spec` draws through two callables, ``ints(lo, hi)`` and ``pick(options)``, so the
same code serves a seeded ``random.Random`` and a Hypothesis ``draw`` (which can then shrink a
failing model). Each kind has a drawer that returns its layer dict, or None when the drawn
layer would not fit (its output would be empty); it draws in a fixed order, so a seed always
gives the same spec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
    "identity": nn.Identity,
    "dropout": lambda: nn.Dropout(0.3),
}

# What random_cnn(s) draw by default: the layers every pass's property tests were written for.
BASIC_KINDS = (
    "conv",
    "conv",
    "convT",
    "bn",
    "act",
    "residual",
    "branch",
    "shared",
    "bn_conv",
    "functional",
    "output",
)
# The wider generator (``kinds=EXTENDED_KINDS``): also training-time multi-branch blocks
# (RepVGG, ACNet, DBB) with random BN, in-place ops on intermediates (result used or an unused
# statement whose effect matters), ops on shapes read at run time, and a ``view(x.shape[0], -1)``
# head (drawn in place of the mean-pool head half of the time).
EXTENDED_KINDS = (
    *BASIC_KINDS,
    "repvgg",
    "repvgg",
    "acnet",
    "dbb",
    "inplace",
    "inplace",
    "shape",
)

Layer = dict[str, Any]


def _out_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@dataclass
class _Draw:
    """The draw callables, and the channels ``c`` and spatial size ``n`` where the spec is."""

    ints: Callable[[int, int], int]
    pick: Callable[[list], Any]
    dims: int
    c: int
    n: int

    @property
    def divisors(self) -> list[int]:
        return [g for g in (1, 2, 4) if self.c % g == 0]

    def channels(self, groups: int) -> int:
        """An output channel count that ``groups`` divides, at most 8 (or ``groups``)."""
        return groups * self.ints(1, max(1, 8 // groups))

    def bias(self) -> bool:
        return self.pick([True, False])


def build_spec(
    ints: Callable[[int, int], int],
    pick: Callable[[list], Any],
    dims: int,
    cin: int,
    size: int,
    max_layers: int,
    kinds: Sequence[str] = BASIC_KINDS,
) -> list[Layer]:
    """Up to ``max_layers`` layers of ``kinds`` for a ``dims``-d input of ``cin`` channels and
    ``size`` wide, then maybe a head (a ``view`` head only when ``kinds`` go beyond the basic)."""
    spec: list[Layer] = []
    d = _Draw(ints, pick, dims, cin, size)
    kinds = list(kinds)
    extended = any(k not in BASIC_KINDS for k in kinds)
    for _ in range(ints(1, max_layers)):
        kind = pick(kinds)
        if kind == "output" and not spec:  # an extra output needs a layer before it
            continue
        layer = _DRAWERS[kind](d, kind)
        if layer is not None:
            spec.append(layer)
    if extended and pick([True, False, False]):  # a head that reads the batch size at run time
        spec.append(dict(kind="view_head", cin=d.c * d.n**dims, cout=ints(1, 6), bias=d.bias()))
    elif pick([True, False]):
        spec.append(dict(kind="head", cin=d.c, cout=ints(1, 6), bias=d.bias()))
    return spec


def _conv(d: _Draw, kind: str) -> Layer | None:
    """``conv``: any conv; ``branch``: a conv that keeps the shape, added to its own output."""
    c, divisors = d.c, d.divisors
    groups = d.pick(divisors + [c])
    cout = d.channels(groups)
    k, stride, dil = d.pick([1, 2, 3]), d.pick([1, 2]), d.pick([1, 2])
    pad = d.ints(0, k // 2 + 1)
    if kind == "branch":  # the add needs the conv to keep the shape
        cout, stride, k, dil = c, 1, d.pick([1, 3]), 1
        pad = k // 2
        groups = d.pick([g for g in divisors if cout % g == 0])
    n = _out_len(d.n, k, stride, pad, dil)
    if n < 1:
        return None
    layer = dict(kind=kind, cin=c, cout=cout, k=k, stride=stride, pad=pad, dil=dil, groups=groups)
    layer["bias"] = d.bias()
    d.c, d.n = cout, n
    return layer


def _conv_transpose(d: _Draw, kind: str) -> Layer | None:
    groups = d.pick(d.divisors)
    cout = d.channels(groups)
    k, stride, dil = d.pick([1, 2, 3]), d.pick([1, 2]), d.pick([1, 2])
    pad = d.ints(0, (dil * (k - 1)) // 2)
    opad = d.ints(0, max(stride, dil) - 1) if stride > 1 else 0
    opad = min(opad, stride - 1) if dil == 1 else min(opad, max(stride, dil) - 1)
    out = (d.n - 1) * stride - 2 * pad + dil * (k - 1) + opad + 1
    if out < 1 or out > 24:
        return None
    layer = dict(kind="convT", cin=d.c, cout=cout, k=k, stride=stride, pad=pad, opad=opad)
    layer.update(dil=dil, groups=groups, bias=d.bias())
    d.c, d.n = cout, out
    return layer


def _same_shape_conv(d: _Draw, kind: str) -> Layer:
    """``residual``: x + BN(conv(x)); ``shared``: one conv module called twice."""
    k = d.pick([1, 3])
    groups = d.pick(d.divisors)
    layer = dict(kind=kind, cin=d.c, cout=d.c, k=k, stride=1, pad=k // 2, dil=1, groups=groups)
    layer["bias"] = d.bias()
    return layer


def _batch_norm(d: _Draw, kind: str) -> Layer:
    # without running stats BN normalises over batch x space: with one pixel, a batch of
    # one would raise, so keep those models valid for every batch size
    affine = d.pick([True, True, False])
    stats = d.pick([True, True, True, False]) if d.n > 1 else True
    return dict(kind="bn", c=d.c, affine=affine, stats=stats)


def _activation(d: _Draw, kind: str) -> Layer:
    return dict(kind="act", act=d.pick(list(ACTIVATIONS)))


def _bn_then_conv(d: _Draw, kind: str) -> Layer | None:
    k = d.pick([1, 3])
    pad = d.pick([0, k // 2])
    groups = d.pick(d.divisors)
    cout = d.channels(groups)
    n = _out_len(d.n, k, 1, pad, 1)
    if n < 1:
        return None
    layer = dict(kind="bn_conv", cin=d.c, cout=cout, k=k, pad=pad, groups=groups, bias=d.bias())
    pad_ok = pad and d.n > pad
    layer["pmode"] = d.pick(["zeros", "zeros", "reflect", "replicate"]) if pad_ok else "zeros"
    d.c, d.n = cout, n
    return layer


def _functional(d: _Draw, kind: str) -> Layer | None:
    """``F.conv`` + ``F.batch_norm`` on parameters of the model itself."""
    k = d.pick([1, 3])
    groups = d.pick(d.divisors)
    cout = d.channels(groups)
    pad = d.pick([0, k // 2])
    n = _out_len(d.n, k, 1, pad, 1)
    if n < 1:
        return None
    layer = dict(kind="functional", cin=d.c, cout=cout, k=k, pad=pad, groups=groups)
    layer["bias"] = d.bias()
    d.c, d.n = cout, n
    return layer


def _output(d: _Draw, kind: str) -> Layer:
    return dict(kind="output")


def _multibranch(d: _Draw, kind: str) -> Layer | None:
    """RepVGG / ACNet (2d only: a RepVGG block elsewhere) / DBB training-time blocks."""
    if kind == "acnet" and d.dims != 2:
        kind = "repvgg"
    c = d.c
    groups = d.pick(d.divisors)
    cout = d.channels(groups)
    stride = d.pick([1, 1, 2])
    k = d.pick([3, 3, 1, 5]) if kind == "repvgg" else d.pick([3, 3, 1])
    n = _out_len(d.n, k, stride, k // 2, 1)
    # (avg_pool3d refuses an input smaller than its kernel, padding or not)
    if n < 1 or (kind == "dbb" and d.n < k):
        return None
    layer = dict(kind=kind, cin=c, cout=cout, k=k, stride=stride, groups=groups)
    layer["bias"] = d.pick([False, False, True])
    layer["identity"] = cout == c and stride == 1 and d.pick([True, True, False])
    d.c, d.n = cout, n
    return layer


def _inplace(d: _Draw, kind: str) -> Layer:
    """conv -> BN with an in-place op on the conv's output or the BN's (see cnn.py)."""
    cout = d.ints(1, 8)
    layer = dict(kind="inplace", cin=d.c, cout=cout, k=d.pick([1, 3]), bias=d.bias())
    layer["where"] = d.pick(["conv", "bn"])
    layer["op"] = d.pick(["mul_", "mul_", "add_", "relu_", "method_relu_", "F.relu", "iadd"])
    layer["per_channel"] = d.pick([True, False])
    layer["use_result"] = d.pick([True, False])
    d.c = cout
    return layer


def _shape(d: _Draw, kind: str) -> Layer:
    op = d.pick(["roundtrip", "cat_ones", "zeros_like_shape", "scale_by_size"])
    d.c += op == "cat_ones"
    return dict(kind="shape", op=op)


_DRAWERS: dict[str, Callable[[_Draw, str], Layer | None]] = {
    "conv": _conv,
    "branch": _conv,
    "convT": _conv_transpose,
    "residual": _same_shape_conv,
    "shared": _same_shape_conv,
    "bn": _batch_norm,
    "act": _activation,
    "bn_conv": _bn_then_conv,
    "functional": _functional,
    "output": _output,
    "repvgg": _multibranch,
    "acnet": _multibranch,
    "dbb": _multibranch,
    "inplace": _inplace,
    "shape": _shape,
}

"""Folding an eval-mode BatchNorm into the Conv / ConvTranspose / Linear beside it.

With ``a = gamma / sqrt(var + eps)`` and ``t = beta - mean * a`` (BN(y) = a*y + t per channel,
:func:`bn_affine`):

BN after the layer (y = layer(x), BN on y's channels, :func:`fold_after`)::

    Conv, Linear:   W'[o] = a[o] * W[o]                 b'[o] = a[o] * b[o] + t[o]
    ConvTranspose:  W is [C_in, C_out/g, k..]; output channel o = gi*(C_out/g) + j lives in
                    W[gi*C_in/g:(gi+1)*C_in/g, j], so W is viewed as [g, C_in/g, C_out/g, k..]
                    and scaled by a.view(g, 1, C_out/g, 1..)      b' as above

BN before the layer (x' = a*x + t on the layer's input channels, :func:`fold_before`)::

    W'[o, c] = W[o, c] * a[cin(o, c)]      b'[o] = b[o] + sum_{c, taps} W[o, c, taps] * t[cin(o, c)]
    (cin(o, c) = group(o) * C/g + c). Exact only where every tap reads a real pixel: padding 0,
    or a non-zero padding mode (reflect/replicate/circular pad BN's output with BN'd values).

:func:`scale_output_channels` and :func:`scale_input_channels` are the two weight scalings on
their own (differentiable, in the weight's dtype: Tune mode folds live parameters with them);
:func:`output_channel_sum` is the adjoint of the first. Pure tensor functions, no graph.
"""

from __future__ import annotations

import torch


def bn_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, t) with BN(y) = a*y + t, in float64."""
    mean, var = mean.double(), var.double()
    gamma = torch.ones_like(mean) if gamma is None else gamma.detach().double()
    beta = torch.zeros_like(mean) if beta is None else beta.detach().double()
    a = gamma / torch.sqrt(var + eps)
    return a, beta - mean * a


def scale_output_channels(
    w: torch.Tensor, a: torch.Tensor, transposed: bool = False, groups: int = 1
) -> torch.Tensor:
    """``w`` scaled per output channel: ``W'[o] = a[o] * W[o]`` (Conv, Linear); ConvTranspose
    (``transposed``: W is [C_in, C_out/g, k..]) per group, output channel ``gi*(C_out/g) + j``
    being ``W[gi*C_in/g:(gi+1)*C_in/g, j]``."""
    tail = [1] * (w.dim() - 2)
    if not transposed:
        return w * a.reshape(-1, 1, *tail)
    grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    return (grouped * a.reshape(groups, 1, -1, *tail)).reshape(w.shape)


def output_channel_sum(t: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """Sum a weight-shaped tensor per output channel (the adjoint of
    :func:`scale_output_channels`'s broadcast: ``dL/da[o] = sum(dL/dW' * W)[o]``)."""
    if not transposed:
        return t.sum(dim=list(range(1, t.dim())))
    grouped = t.reshape(groups, t.shape[0] // groups, *t.shape[1:])
    return grouped.sum(dim=[1, *range(3, grouped.dim())]).reshape(-1)


def per_input_channel(v: torch.Tensor, out: int, c_g: int, groups: int) -> torch.Tensor:
    """A per-input-channel vector ``v`` (``C = groups * c_g`` entries) laid out as [out, c_g]
    for a layer with ``out`` outputs: entry ``[o, c]`` is ``v[cin(o, c)]``, the channel that
    input ``c`` of output ``o``'s group reads (``cin(o, c) = group(o) * c_g + c``)."""
    return v.reshape(groups, 1, c_g).expand(groups, out // groups, c_g).reshape(out, c_g)


def scale_input_channels(w: torch.Tensor, a: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``W'[o, c] = W[o, c] * a[cin(o, c)]`` for a Conv / Linear weight [out, C/g, k..]."""
    out, c_g = w.shape[0], w.shape[1]
    return w * per_input_channel(a, out, c_g, groups).reshape(out, c_g, *([1] * (w.dim() - 2)))


def fold_after(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    t: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``BN(layer(x))`` as one layer. ``kind``: conv | convT | linear."""
    w = weight.detach().double()
    b = torch.zeros_like(a) if bias is None else bias.detach().double()
    w = scale_output_channels(w, a, kind == "convT", groups)
    return w.to(weight.dtype), (a * b + t).to(weight.dtype)


def fold_before(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    t: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``layer(BN(x))`` as one layer (conv or linear; exact only without padding)."""
    w = weight.detach().double()
    out = w.shape[0]
    b = torch.zeros(out, dtype=torch.float64) if bias is None else bias.detach().double()
    w_new = scale_input_channels(w, a, groups)
    # per (output, local input) channel: the BN shift of the input channel it reads
    c_g = w.shape[1]  # input channels per group
    taps = w.reshape(out, c_g, -1).sum(-1)
    b_new = b + (taps * per_input_channel(t, out, c_g, groups)).sum(1)
    return w_new.to(weight.dtype), b_new.to(weight.dtype)

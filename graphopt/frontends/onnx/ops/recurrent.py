"""LSTM, GRU and RNN -> torch's ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (one layer).

An ONNX node is one layer, forward, reverse or bidirectional. With constant weights it becomes a
``call_module`` of the torch module (which torch's TorchScript exporter writes back as the ONNX
op); with weights computed at run time (ONNX's node tests feed them as graph inputs) a call of
``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu``, which export alike.

Per direction d, ONNX's weights W [D, G*H, I], R [D, G*H, H], B [D, 2*G*H] (B = [Wb, Rb]) hold
the gates in another order than torch's::

    LSTM  ONNX i o f c   torch i f g(=c) o      w_ih = W[d] regated, w_hh = R[d] regated
    GRU   ONNX z r h     torch r z n(=h)        b_ih = Wb[d] regated, b_hh = Rb[d] regated
    RNN   one gate

torch's GRU computes n = tanh(W_in x + b_in + r * (W_hn h + b_hn)): ONNX's
``linear_before_reset=1``.  Layout 0 is torch's ``batch_first=False``, layout 1 ``True``; then

    Y   [S, D, B, H] = out [S, B, D*H] reshaped to [S, B, D, H], axes 1 and 2 swapped
        [B, S, D, H] = out [B, S, D*H] reshaped (layout 1)
    Y_h, Y_c  [D, B, H] = h_n, c_n;  [B, D, H] = h_n transposed (layout 1); initial_h alike

``direction=reverse`` alone (torch has no reverse-only layer) runs forward over the sequence
flipped in time and flips Y back: the reverse pass over x_{S-1} .. x_0 is the forward pass over
flip(x), and its final state (after x_0) is the forward pass's.

What torch's modules do not compute -- GRU's ``linear_before_reset=0``, peepholes ``P`` other
than constant zeros, ``sequence_lens`` other than a constant full length, activations other than
the defaults (RNN: other than one of Tanh / Relu for both directions), ``clip``,
``input_forget=1`` -- runs as ONNX's own equations step by step (:mod:`.recurrent_loop`), which
export as the ONNX node again. Refused (the node stays opaque, run by ONNX Runtime), naming the
attribute: Affine / ScaledTanh / ThresholdedRelu without their activation_alpha / beta (the
spec's defaults and ONNX Runtime's differ).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import set_param
from graphopt.frontends.onnx.ops.recurrent_loop import (
    DEFAULT_ACTIVATIONS,
    activation_names,
    activations,
    recurrent_loop,
    traced_as_call,
)
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.values import Value

# torch's k-th gate is ONNX's ORDER[op][k]
ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
_MODULES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


def regate(w: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Rows of ``w`` ([G*H, ...], gates in ONNX's order) in torch's gate order."""
    if len(order) == 1:
        return w
    chunks = w.chunk(len(order), 0)
    return torch.cat([chunks[k] for k in order], 0)


@traced_as_call
def torch_weights(
    w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, order: tuple[int, ...]
) -> list[torch.Tensor]:
    """ONNX's W, R, B -> torch's flat weights: per direction w_ih, w_hh (, b_ih, b_hh)."""
    flat: list[torch.Tensor] = []
    for d in range(w.shape[0]):
        flat += [regate(w[d], order), regate(r[d], order)]
        if b is not None:
            wb, rb = b[d].chunk(2, 0)
            flat += [regate(wb, order), regate(rb, order)]
    return flat


@traced_as_call
def run_recurrent(
    mode: str,
    x: torch.Tensor,
    hx: list[torch.Tensor | None],
    weights: list[torch.Tensor],
    has_biases: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[torch.Tensor, ...]:
    """torch's functional RNN (weights known only at run time): (out, h_n) or (out, h_n, c_n),
    as the module returns them; ``mode`` is lstm, gru, rnn_tanh or rnn_relu."""
    dirs = 2 if bidirectional else 1
    batch = x.size(0) if batch_first else x.size(1)
    hidden = weights[1].shape[1]
    states = [
        h if h is not None else x.new_zeros(dirs, batch, hidden)
        for h in hx[: 2 if mode == "lstm" else 1]
    ]
    args = (has_biases, 1, 0.0, False, bidirectional, batch_first)
    if mode == "lstm":
        return tuple(torch.lstm(x, states, weights, *args))
    fn = {"gru": torch.gru, "rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu}[mode]
    return tuple(fn(x, states[0], weights, *args))


def _direction(ctx: Ctx) -> str:
    direction = ctx.attr("direction", "forward")  # a string attribute comes decoded
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ctx.fail(f"direction={direction!r} is not a valid value")
    return direction


def _module_form(ctx: Ctx, dirs: int) -> str:
    """The nonlinearity of torch's module for the node's activations ("tanh" for LSTM and GRU,
    "tanh" or "relu" for RNN), "" when only :func:`recurrent_loop` computes them (other
    activations, clip, input_forget); refuses what neither computes."""
    funcs = activations(ctx.op, dirs, ctx.attrs)
    if isinstance(funcs, str):
        raise ctx.fail(f"{funcs}, which graphopt does not compute")
    if ctx.attr("clip") is not None or (ctx.op == "LSTM" and ctx.attr("input_forget", 0)):
        return ""
    names = activation_names(ctx.op, dirs, ctx.attrs)
    if ctx.op == "RNN":
        return names[0] if len(set(names)) == 1 and names[0] in ("tanh", "relu") else ""
    defaults = [a.lower() for a in DEFAULT_ACTIVATIONS[ctx.op]]
    return "tanh" if names == defaults * dirs else ""


def _needs_loop(ctx: Ctx, seq_axis: int) -> str:
    """Why torch's modules cannot compute the node ("" when they can): GRU's
    linear_before_reset=0, peepholes other than constant zeros, sequence_lens other than a
    constant full length. :func:`recurrent_loop` computes those."""
    if ctx.op == "GRU" and not ctx.attr("linear_before_reset", 0):
        return "linear_before_reset=0"
    if ctx.op == "LSTM" and ctx.has(7):
        p = ctx.const(7)
        if p is None or bool(p.any()):
            return "peepholes"
    if ctx.has(4):
        lens = ctx.const(4)
        seq = ctx.static_dim(0, seq_axis)
        if lens is None or seq is None or not bool((lens == seq).all()):
            return "sequence_lens"
    return ""


def _loop(ctx: Ctx) -> list[Value | None]:
    """The node as :func:`recurrent_loop` (ONNX's equations step by step; exported as the node)."""
    count = 8 if ctx.op == "LSTM" else 6
    inputs = [ctx.tensor(i) if ctx.has(i) else None for i in range(count)]
    attrs = []
    for name, value in sorted(ctx.attrs.items()):
        if name == "output_sequence":  # LSTM-1's, gone since opset 7 (Y is always computed)
            continue
        if isinstance(value, list):  # a list attribute's strings come as bytes
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
            if not value:
                continue
        attrs.append((name, value))
    result = ctx.call(recurrent_loop, ctx.op, tuple(attrs), *inputs)
    return [ctx.call(operator.getitem, result, k) for k in range(3 if ctx.op == "LSTM" else 2)]


@converter("LSTM", "GRU", "RNN")
def _recurrent(ctx: Ctx) -> list[Value | None]:
    direction = _direction(ctx)
    dirs = 2 if direction == "bidirectional" else 1
    nonlinearity = _module_form(ctx, dirs)
    layout = int(ctx.attr("layout", 0))
    seq_axis = 1 if layout else 0
    if not nonlinearity or _needs_loop(ctx, seq_axis):
        return _loop(ctx)
    hidden = _hidden_size(ctx)
    x = ctx.tensor(0)
    if direction == "reverse":
        x = ctx.call(torch.flip, x, [seq_axis])
    states = [_state(ctx, i, layout) for i in ((5, 6) if ctx.op == "LSTM" else (5,))]
    results = _run(ctx, x, states, dirs, nonlinearity, bool(layout))
    # [.., .., D*H] -> [.., .., D, H]: a reshape by the sizes (the TorchScript exporter freezes
    # the leading dims of Tensor.unflatten's output to the example's)
    out = results[0]
    y = ctx.method(
        "reshape", out, ctx.method("size", out, 0), ctx.method("size", out, 1), dirs, hidden
    )
    if direction == "reverse":
        y = ctx.call(torch.flip, y, [seq_axis])
    outputs: list[Value | None] = [y if layout else ctx.method("transpose", y, 1, 2)]
    for state in results[1:]:
        outputs.append(ctx.method("transpose", state, 0, 1) if layout else state)
    return outputs


def _hidden_size(ctx: Ctx) -> int:
    r = ctx.shape(2)
    hidden = ctx.attr("hidden_size")
    if hidden is None and r is not None and isinstance(r[-1], int):
        hidden = r[-1]
    if hidden is None:
        raise ctx.fail("hidden_size is not given and R's shape is unknown")
    return int(hidden)


def _state(ctx: Ctx, i: int, layout: int) -> Value | None:
    """initial_h / initial_c as torch wants them ([D, B, H]), None when absent."""
    if not ctx.has(i):
        return None
    h = ctx.tensor(i)
    return ctx.method("contiguous", ctx.method("transpose", h, 0, 1)) if layout else h


def _run(
    ctx: Ctx,
    x: Value,
    states: list[Value | None],
    dirs: int,
    nonlinearity: str,
    batch_first: bool,
) -> list[Value]:
    """The layer's [out, h_n] ([out, h_n, c_n] for LSTM): a torch module's call when the weights
    are constant, torch's functional form otherwise."""
    order = ORDER[ctx.op]
    w, r, b = ctx.value(1), ctx.value(2), ctx.value(3)
    count = 3 if ctx.op == "LSTM" else 2
    if (
        isinstance(w, torch.Tensor)
        and isinstance(r, torch.Tensor)
        and (b is None or isinstance(b, torch.Tensor))
    ):
        mod = _module(ctx, torch_weights(w, r, b, order), dirs, nonlinearity, batch_first)
        if ctx.op == "LSTM" and any(s is not None for s in states):
            h, c = states
            h = h if h is not None else ctx.call(torch.zeros_like, c)
            c = c if c is not None else ctx.call(torch.zeros_like, h)
            result = ctx.module(mod, x, (h, c))
        else:
            result = ctx.module(mod, x, *[s for s in states if s is not None])
        out = ctx.call(operator.getitem, result, 0)
        if ctx.op != "LSTM":
            return [out, ctx.call(operator.getitem, result, 1)]
        hc = ctx.call(operator.getitem, result, 1)
        return [out, *(ctx.call(operator.getitem, hc, k) for k in range(2))]
    bias = None if b is None else ctx.tensor(3)
    weights = ctx.call(torch_weights, ctx.tensor(1), ctx.tensor(2), bias, order)
    mode = ctx.op.lower() if ctx.op != "RNN" else f"rnn_{nonlinearity}"
    result = ctx.call(
        run_recurrent, mode, x, states, weights, b is not None, dirs == 2, batch_first
    )
    return [ctx.call(operator.getitem, result, k) for k in range(count)]


def _module(
    ctx: Ctx, weights: list[torch.Tensor], dirs: int, nonlinearity: str, batch_first: bool
) -> nn.Module:
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` layer holding torch's flat weights."""
    w_ih, w_hh = weights[0], weights[1]
    kwargs: dict[str, Any] = {"nonlinearity": nonlinearity} if ctx.op == "RNN" else {}
    mod = _MODULES[ctx.op](
        w_ih.shape[1],
        w_hh.shape[1],
        bias=len(weights) == 4 * dirs,
        batch_first=batch_first,
        bidirectional=dirs == 2,
        dtype=w_ih.dtype,
        **kwargs,
    )
    for name, value in zip(mod._flat_weights_names, weights, strict=True):
        set_param(mod, name, value)
    return mod

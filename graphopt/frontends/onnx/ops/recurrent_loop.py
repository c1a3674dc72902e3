"""ONNX's LSTM / GRU / RNN as the spec writes them, for what torch's modules do not compute.

:func:`recurrent_loop` runs the recurrence step by step in torch (any sequence length, any
batch) and, when the graph is exported, writes the very ONNX node back (an autograd Function
whose ``symbolic`` emits it with the node's attributes; ``layout=1`` as layout 0 between
transposes, since ONNX Runtime has no batchwise kernels), so that the artifact keeps the op and
its dynamic sequence length. The converter uses it for GRU's ``linear_before_reset=0``, LSTM's
peepholes ``P`` and ``sequence_lens``; torch's modules for the rest.

Per direction, gates in ONNX's order (f = sigmoid, g = h = tanh; RNN: f = tanh or relu)::

    LSTM  i = f(x Wi' + h Ri' + Pi*c + Wbi + Rbi)    f_ = f(x Wf' + h Rf' + Pf*c + Wbf + Rbf)
          c~ = g(x Wc' + h Rc' + Wbc + Rbc)         c' = f_*c + i*c~
          o = f(x Wo' + h Ro' + Po*c' + Wbo + Rbo)   h' = o * h(c')
    GRU   z = f(x Wz' + h Rz' + Wbz + Rbz)           r = f(x Wr' + h Rr' + Wbr + Rbr)
          n = g(x Wh' + (r*h) Rh' + Rbh + Wbh)       (linear_before_reset=0)
          n = g(x Wh' + r*(h Rh' + Rbh) + Wbh)       (linear_before_reset=1)
          h' = (1 - z)*n + z*h
    RNN   h' = f(x Wi' + h Ri' + Wbi + Rbi)

``sequence_lens``: batch entry b runs steps t < len[b] (the reverse direction from len[b] - 1
down); Y is 0 past its length, Y_h / Y_c are its state after its last step.
"""

from __future__ import annotations

from typing import Any

import torch

# ONNX's attribute -> the suffix of the TorchScript exporter's g.op keyword
_ATTR_KIND = {int: "i", float: "f", str: "s"}


def _unused(g: Any) -> Any:
    """A missing optional input of an exported node (what torch's own symbolics emit)."""
    n = g.op("prim::Constant")
    n.setType(torch._C.OptionalType.ofTensor())
    return n


def _attr_kwargs(attrs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    kwargs = {}
    for name, value in attrs:
        first = value[0] if isinstance(value, list | tuple) and value else value
        kwargs[f"{name}_{_ATTR_KIND[type(first)]}"] = value
    return kwargs


class _RecurrentOp(torch.autograd.Function):
    """The recurrence in torch; exported as the ONNX node itself."""

    @staticmethod
    def forward(ctx: Any, op: str, attrs: tuple, *inputs: torch.Tensor | None) -> Any:
        return _compute(op, dict(attrs), *inputs)

    @staticmethod
    def symbolic(g: Any, op: str, attrs: tuple, *inputs: Any) -> Any:
        # layout=1 is written as layout 0 between transposes: ONNX Runtime has no batchwise
        # recurrent kernels
        layout = dict(attrs).get("layout", 0)
        kwargs = _attr_kwargs(tuple((k, v) for k, v in attrs if k != "layout"))
        args = list(inputs)
        for i in (0, 5, 6) if layout else ():  # X, initial_h, initial_c: swap axes 0 and 1
            if i < len(args) and args[i] is not None:
                args[i] = g.op("Transpose", args[i], perm_i=[1, 0, 2])
        args = [_unused(g) if v is None else v for v in args]
        outs = list(g.op(op, *args, outputs=3 if op == "LSTM" else 2, **kwargs))
        if layout:  # Y [S, D, B, H] -> [B, S, D, H]; Y_h, Y_c [D, B, H] -> [B, D, H]
            outs[0] = g.op("Transpose", outs[0], perm_i=[2, 0, 1, 3])
            outs[1:] = [g.op("Transpose", o, perm_i=[1, 0, 2]) for o in outs[1:]]
        return tuple(outs)


def recurrent_loop(
    op: str, attrs: tuple[tuple[str, Any], ...], *inputs: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """ONNX ``op`` (LSTM, GRU, RNN) on its 8 (LSTM) or 6 inputs (None where absent), with the
    node's attributes as (name, value) pairs: (Y, Y_h[, Y_c])."""
    return tuple(_RecurrentOp.apply(op, attrs, *inputs))


def _compute(
    op: str,
    attrs: dict[str, Any],
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None = None,
    lens: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    layout = int(attrs.get("layout", 0))
    if layout:  # batch-major -> sequence-major, and back at the end
        x = x.transpose(0, 1)
        h0 = None if h0 is None else h0.transpose(0, 1)
        c0 = None if c0 is None else c0.transpose(0, 1)
    seq, batch = x.shape[0], x.shape[1]
    dirs, hidden = w.shape[0], r.shape[-1]
    gates = w.shape[1] // hidden
    zeros = x.new_zeros(dirs, batch, hidden)
    h0 = zeros if h0 is None else h0
    c0 = zeros if c0 is None else c0
    b = x.new_zeros(dirs, 2 * gates * hidden) if b is None else b
    p = x.new_zeros(dirs, 3 * hidden) if p is None else p
    mask = None if lens is None else torch.arange(seq).unsqueeze(1) < lens.to(torch.int64)
    reverse_only = attrs.get("direction", "forward") == "reverse"
    ys, hs, cs = [], [], []
    for d in range(dirs):
        steps = range(seq - 1, -1, -1) if reverse_only or d == 1 else range(seq)
        wb, rb = b[d].chunk(2)
        xw = torch.matmul(x, w[d].t()) + wb  # every step's input projection at once
        y, h, c = _direction(op, attrs, xw, r[d], rb, p[d], h0[d], c0[d], steps, mask)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    y, h, c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
    if layout:
        y, h, c = y.permute(2, 0, 1, 3), h.transpose(0, 1), c.transpose(0, 1)
    return (y, h, c) if op == "LSTM" else (y, h)


def _direction(
    op: str,
    attrs: dict[str, Any],
    xw: torch.Tensor,
    rw: torch.Tensor,
    rb: torch.Tensor,
    p: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    steps: range,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction over ``steps``: Y [S, B, H] and the final h, c."""
    ys: list[torch.Tensor | None] = [None] * xw.shape[0]
    for t in steps:
        if op == "LSTM":
            h_new, c_new = _lstm_step(xw[t], h, c, rw, rb, p)
        elif op == "GRU":
            h_new, c_new = _gru_step(xw[t], h, rw, rb, int(attrs.get("linear_before_reset", 0))), c
        else:
            pre = xw[t] + torch.matmul(h, rw.t()) + rb
            relu = [a.lower() for a in attrs.get("activations", ["Tanh"])][0] == "relu"
            h_new, c_new = (torch.relu(pre) if relu else torch.tanh(pre)), c
        if mask is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:  # entries past their length keep their state and output 0
            m = mask[t].unsqueeze(-1)
            h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
            ys[t] = torch.where(m, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c  # type: ignore[arg-type]


def _lstm_step(
    xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor, rw: torch.Tensor, rb: torch.Tensor, p: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    pi, po, pf = p.chunk(3)
    gi, go, gf, gc = (xw + torch.matmul(h, rw.t()) + rb).chunk(4, -1)
    i = torch.sigmoid(gi + pi * c)
    f = torch.sigmoid(gf + pf * c)
    c = f * c + i * torch.tanh(gc)
    o = torch.sigmoid(go + po * c)
    return o * torch.tanh(c), c


def _gru_step(
    xw: torch.Tensor, h: torch.Tensor, rw: torch.Tensor, rb: torch.Tensor, linear_before_reset: int
) -> torch.Tensor:
    xz, xr, xh = xw.chunk(3, -1)
    rz, rr, rh = rw.chunk(3, 0)
    bz, br, bh = rb.chunk(3)
    z = torch.sigmoid(xz + torch.matmul(h, rz.t()) + bz)
    r = torch.sigmoid(xr + torch.matmul(h, rr.t()) + br)
    if linear_before_reset:
        n = torch.tanh(xh + r * (torch.matmul(h, rh.t()) + bh))
    else:
        n = torch.tanh(xh + torch.matmul(r * h, rh.t()) + bh)
    return (1 - z) * n + z * h

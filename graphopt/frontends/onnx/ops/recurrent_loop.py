"""ONNX's LSTM / GRU / RNN as the spec writes them, for what torch's modules do not compute.

:func:`recurrent_loop` runs the recurrence step by step in torch (any sequence length, any
batch) and, when the graph is exported, writes the very ONNX node back (an autograd Function
whose ``symbolic`` emits it with the node's attributes; ``layout=1`` as layout 0 between
transposes, since ONNX Runtime has no batchwise kernels), so that the artifact keeps the op and
its dynamic sequence length. The converter uses it where torch's modules fall short: GRU's
``linear_before_reset=0``, LSTM's peepholes ``P``, ``sequence_lens``, other activations
(Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, Softsign, Softplus, with
``activation_alpha`` / ``activation_beta`` consumed in order), ``clip`` and ``input_forget``.

Per direction, gates in ONNX's order (by default f = sigmoid, g = h = tanh; RNN: f = tanh)::

    LSTM  i = f(x Wi' + h Ri' + Pi*c + Wbi + Rbi)    f_ = f(x Wf' + h Rf' + Pf*c + Wbf + Rbf)
          c~ = g(x Wc' + h Rc' + Wbc + Rbc)         c' = f_*c + i*c~
          o = f(x Wo' + h Ro' + Po*c' + Wbo + Rbo)   h' = o * h(c')
    GRU   z = f(x Wz' + h Rz' + Wbz + Rbz)           r = f(x Wr' + h Rr' + Wbr + Rbr)
          n = g(x Wh' + (r*h) Rh' + Rbh + Wbh)       (linear_before_reset=0)
          n = g(x Wh' + r*(h Rh' + Rbh) + Wbh)       (linear_before_reset=1)
          h' = (1 - z)*n + z*h
    RNN   h' = f(x Wi' + h Ri' + Wbi + Rbi)

``input_forget=1``: f_ = 1 - i.  ``clip``: the inputs of f and g are clamped to [-clip, clip]
(of LSTM's h(c') not: ONNX Runtime's reading of "the input of activations").
``sequence_lens``: batch entry b runs steps t < len[b] (the reverse direction from len[b] - 1
down); Y is 0 past its length, Y_h / Y_c are its state after its last step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

# ONNX's attribute -> the suffix of the TorchScript exporter's g.op keyword
_ATTR_KIND = {int: "i", float: "f", str: "s"}

_F = TypeVar("_F", bound=Callable[..., Any])
Activation = Callable[[torch.Tensor], torch.Tensor]
# ONNX's activation functions of recurrent ops: name -> (f(x, alpha, beta), takes alpha, beta)
_FUNCTIONS: dict[str, tuple[Callable[..., torch.Tensor], bool, bool]] = {
    "relu": (lambda x, a, b: torch.relu(x), False, False),
    "tanh": (lambda x, a, b: torch.tanh(x), False, False),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), False, False),
    "softsign": (lambda x, a, b: x / (1 + x.abs()), False, False),
    "softplus": (lambda x, a, b: torch.log1p(torch.exp(x)), False, False),
    "affine": (lambda x, a, b: a * x + b, True, True),
    "leakyrelu": (lambda x, a, b: torch.where(x >= 0, x, a * x), True, False),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), True, False),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), True, True),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0, 1), True, True),
    "elu": (lambda x, a, b: torch.where(x >= 0, x, a * torch.expm1(x)), True, False),
}
# alpha / beta when the lists run out: the ONNX operators' defaults, where spec and ONNX Runtime
# agree on one (Affine, ScaledTanh, ThresholdedRelu then need theirs given)
_DEFAULT_ALPHA = {"leakyrelu": 0.01, "hardsigmoid": 0.2, "elu": 1.0}
_DEFAULT_BETA = {"hardsigmoid": 0.5}
DEFAULT_ACTIVATIONS = {
    "LSTM": ["Sigmoid", "Tanh", "Tanh"],
    "GRU": ["Sigmoid", "Tanh"],
    "RNN": ["Tanh"],
}


def activation_names(op: str, dirs: int, attrs: dict[str, Any]) -> list[str]:
    """The node's activations, lower case, for every direction (the defaults when absent)."""
    names = attrs.get("activations") or DEFAULT_ACTIVATIONS[op] * dirs
    return [str(n.decode() if isinstance(n, bytes) else n).lower() for n in names]


def activations(op: str, dirs: int, attrs: dict[str, Any]) -> list[list[Activation]] | str:
    """Per direction, the activation functions (f, g, h) of the node; a reason string when
    they are not computed here (an unknown name, a count that does not fit, a parameter whose
    default spec and ONNX Runtime disagree on)."""
    names = activation_names(op, dirs, attrs)
    per = len(DEFAULT_ACTIVATIONS[op])
    if len(names) != per * dirs:
        return f"activations={names} has not {per} per direction ({dirs})"
    alphas = list(attrs.get("activation_alpha", []))
    betas = list(attrs.get("activation_beta", []))
    out: list[Activation] = []
    for name in names:
        if name not in _FUNCTIONS:
            return f"activations: {name!r} is not an activation of ONNX's recurrent ops"
        fn, takes_alpha, takes_beta = _FUNCTIONS[name]
        alpha = beta = 0.0
        if takes_alpha:
            alpha = alphas.pop(0) if alphas else _DEFAULT_ALPHA.get(name)
        if takes_beta:
            beta = betas.pop(0) if betas else _DEFAULT_BETA.get(name)
        if alpha is None or beta is None:
            return f"activations: {name!r} needs its activation_alpha/activation_beta given"
        out.append(functools.partial(fn, a=float(alpha), b=float(beta)))
    return [out[d * per : (d + 1) * per] for d in range(dirs)]


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


def traced_as_call(fn: _F) -> _F:
    """``fn`` stays one ``call_function`` node when torch.fx traces a graph calling it (as
    unpickling a GraphModule does: it re-traces the code) instead of being traced into."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxies: list[torch.fx.Proxy] = []
        torch.fx.node.map_aggregate(
            (args, kwargs), lambda a: proxies.append(a) if isinstance(a, torch.fx.Proxy) else a
        )
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", wrapper, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@traced_as_call
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
    funcs = activations(op, dirs, attrs)
    if isinstance(funcs, str):
        raise ValueError(funcs)
    zeros = x.new_zeros(dirs, batch, hidden)
    h0 = zeros if h0 is None else h0
    c0 = zeros if c0 is None else c0
    b = x.new_zeros(dirs, 2 * gates * hidden) if b is None else b
    p = x.new_zeros(dirs, 3 * hidden) if p is None else p
    mask = None if lens is None else torch.arange(seq).unsqueeze(1) < lens.to(torch.int64)
    clip = attrs.get("clip")
    reverse_only = attrs.get("direction", "forward") == "reverse"
    ys, hs, cs = [], [], []
    for d in range(dirs):
        fns = funcs[d]
        if clip is not None:  # bounds the inputs of the gates' activations to [-clip, clip]
            # (not LSTM's h(c'): as ONNX Runtime, which writes "the input of activations")
            keep = 1 if op == "LSTM" else 0
            fns = [_clipped(fn, float(clip)) for fn in fns[: len(fns) - keep]] + fns[
                len(fns) - keep :
            ]
        cell = functools.partial(
            _STEPS[op], rw=r[d], rb=b[d].chunk(2)[1], p=p[d], fns=fns, attrs=attrs
        )
        steps = range(seq - 1, -1, -1) if reverse_only or d == 1 else range(seq)
        xw = torch.matmul(x, w[d].t()) + b[d].chunk(2)[0]  # every step's input projection
        y, h, c = _direction(cell, xw, h0[d], c0[d], steps, mask)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    y, h, c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
    if layout:
        y, h, c = y.permute(2, 0, 1, 3), h.transpose(0, 1), c.transpose(0, 1)
    return (y, h, c) if op == "LSTM" else (y, h)


def _clipped(fn: Activation, clip: float) -> Activation:
    return lambda x: fn(torch.clamp(x, -clip, clip))


def _direction(
    cell: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    xw: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    steps: range,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction over ``steps``: Y [S, B, H] and the final h, c."""
    ys: list[torch.Tensor | None] = [None] * xw.shape[0]
    for t in steps:
        h_new, c_new = cell(xw[t], h, c)
        if mask is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:  # entries past their length keep their state and output 0
            m = mask[t].unsqueeze(-1)
            h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
            ys[t] = torch.where(m, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c  # type: ignore[arg-type]


def _lstm_step(
    xw: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    rw: torch.Tensor,
    rb: torch.Tensor,
    p: torch.Tensor,
    fns: list[Activation],
    attrs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    f_, g_, h_ = fns
    pi, po, pf = p.chunk(3)
    gi, go, gf, gc = (xw + torch.matmul(h, rw.t()) + rb).chunk(4, -1)
    i = f_(gi + pi * c)
    # input_forget=1 couples the gates: forget what is input
    f = 1 - i if attrs.get("input_forget", 0) else f_(gf + pf * c)
    c = f * c + i * g_(gc)
    o = f_(go + po * c)
    return o * h_(c), c


def _gru_step(
    xw: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    rw: torch.Tensor,
    rb: torch.Tensor,
    p: torch.Tensor,
    fns: list[Activation],
    attrs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    f_, g_ = fns
    xz, xr, xh = xw.chunk(3, -1)
    rz, rr, rh = rw.chunk(3, 0)
    bz, br, bh = rb.chunk(3)
    z = f_(xz + torch.matmul(h, rz.t()) + bz)
    r = f_(xr + torch.matmul(h, rr.t()) + br)
    if attrs.get("linear_before_reset", 0):
        n = g_(xh + r * (torch.matmul(h, rh.t()) + bh))
    else:
        n = g_(xh + torch.matmul(r * h, rh.t()) + bh)
    return (1 - z) * n + z * h, c


def _rnn_step(
    xw: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    rw: torch.Tensor,
    rb: torch.Tensor,
    p: torch.Tensor,
    fns: list[Activation],
    attrs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    return fns[0](xw + torch.matmul(h, rw.t()) + rb), c


_STEPS = {"LSTM": _lstm_step, "GRU": _gru_step, "RNN": _rnn_step}

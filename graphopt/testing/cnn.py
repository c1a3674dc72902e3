"""Random CNNs: :func:`random_cnn` from a seed, :func:`random_cnns` as a Hypothesis strategy; the
module interprets a spec drawn by :func:`graphopt.testing.cnn_spec.build_spec`."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.testing.cnn_spec import ACTIVATIONS, BASIC_KINDS, build_spec
from graphopt.testing.models import randomize_bn


@dataclass
class CNNCase:
    """A random CNN, its example inputs, and the spec it was built from (for shrinking output)."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    spec: list[dict[str, Any]] = field(default_factory=list)
    dims: int = 2

    def other_batch(self) -> tuple[torch.Tensor, ...]:
        """Fresh inputs two samples larger in the batch dimension (deterministic per case)."""
        return tuple(
            torch.randn(
                x.shape[0] + 2, *x.shape[1:], generator=torch.Generator().manual_seed(x.numel())
            ).to(x.dtype)
            for x in self.inputs
        )

    def __repr__(self) -> str:
        body = "\n  ".join(str(s) for s in self.spec)
        shapes = [tuple(x.shape) for x in self.inputs]
        return f"CNNCase(dims={self.dims}, inputs={shapes},\n  {body})"


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _RandomCNN(nn.Module):
    """Interprets a spec (a list of layer dicts); FX unrolls the loop when tracing."""

    def __init__(self, spec: list[dict[str, Any]], dims: int, seed: int) -> None:
        super().__init__()
        self.spec = spec
        self.dims = dims
        self.layers = nn.ModuleList()
        self.fweights = nn.ParameterList()
        gen = torch.Generator().manual_seed(seed)
        # the layers' default initialisation draws from the global RNG: seed it (in a fork, so
        # the caller's RNG is untouched) and the same seed always gives the same weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for s in spec:
                self.layers.append(self._make(s, gen))
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                randomize_bn(m, gen)

    def _make(self, s: dict[str, Any], gen: torch.Generator) -> nn.Module:
        d = self.dims
        kind = s["kind"]
        if kind in ("conv", "residual", "branch", "shared", "convT"):
            conv = _conv(d, s)
            if kind == "shared":
                return nn.ModuleList([conv])
            return nn.ModuleList([conv, _BN[d](s["cout"])])
        if kind == "bn":
            return _BN[d](s["c"], affine=s["affine"], track_running_stats=s["stats"])
        if kind == "bn_conv":
            return nn.ModuleList([_BN[d](s["cin"]), _conv(d, s)])
        if kind == "act":
            return ACTIVATIONS[s["act"]]()
        if kind == "functional":
            shape = (s["cout"], s["cin"] // s["groups"], *([s["k"]] * d))
            self.fweights.append(nn.Parameter(torch.randn(shape, generator=gen) * 0.3))
            self.fweights.append(nn.Parameter(torch.randn(s["cout"], generator=gen) * 0.1))
            bn = _BN[d](s["cout"])
            return nn.ModuleList([bn])
        if kind in ("head", "view_head"):
            return nn.ModuleList(
                [nn.Linear(s["cin"], s["cout"], bias=s["bias"]), nn.BatchNorm1d(s["cout"])]
            )
        if kind == "output":
            return nn.Identity()  # a placeholder: forward() only records x, calls nothing
        if kind in ("repvgg", "acnet", "dbb"):
            return self._make_multibranch(s)
        if kind == "inplace":
            conv = _CONV[d](s["cin"], s["cout"], s["k"], padding=s["k"] // 2, bias=s["bias"])
            scale = nn.Module()  # holds the per-channel operand as a buffer
            scale.register_buffer("value", torch.rand(s["cout"], *[1] * d, generator=gen) + 0.5)
            return nn.ModuleList([conv, _BN[d](s["cout"]), scale])
        if kind == "shape":
            return nn.Identity()  # forward() does the shape arithmetic itself
        raise ValueError(kind)

    def _make_multibranch(self, s: dict[str, Any]) -> nn.Module:
        """RepVGG / ACNet / DBB-style training-time blocks: parallel conv+BN branches summed."""
        d, cin, cout, k, st, g = self.dims, s["cin"], s["cout"], s["k"], s["stride"], s["groups"]
        conv, bn = _CONV[d], _BN[d]

        def branch(kernel: Any, pad: Any) -> nn.Module:
            return nn.Sequential(
                conv(cin, cout, kernel, stride=st, padding=pad, groups=g, bias=s["bias"]),
                bn(cout),
            )

        block = nn.ModuleDict({"kxk": branch(k, k // 2)})
        if s["kind"] == "repvgg":
            block["1x1"] = branch(1, 0)
            if s["identity"]:
                block["id"] = bn(cout)
        elif s["kind"] == "acnet":  # 2d only: kxk + 1xk + kx1
            block["1xk"] = branch((1, k), (0, k // 2))
            block["kx1"] = branch((k, 1), (k // 2, 0))
        else:  # dbb: kxk, 1x1, 1x1 -> kxk, 1x1 -> avg pool
            block["1x1"] = branch(1, 0)
            block["1x1_kxk"] = nn.Sequential(
                conv(cin, cin, 1, groups=g, bias=False),
                bn(cin),
                conv(cin, cout, k, stride=st, padding=k // 2, groups=g, bias=s["bias"]),
                bn(cout),
            )
            pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[d]
            block["1x1_avg"] = nn.Sequential(
                conv(cin, cout, 1, groups=g, bias=False),
                bn(cout),
                pool(k, stride=st, padding=k // 2),
                bn(cout),
            )
        return block

    def forward(self, x: torch.Tensor) -> Any:
        extra = []
        fw = 0
        convs_by_index: dict[int, nn.Module] = {}
        for i, (s, layer) in enumerate(zip(self.spec, self.layers, strict=True)):
            kind = s["kind"]
            if kind in ("conv", "convT"):
                x = layer[1](layer[0](x))
                convs_by_index[i] = layer[0]
            elif kind == "residual":
                x = x + layer[1](layer[0](x))
            elif kind == "branch":
                y = layer[0](x)  # the conv output has two users
                x = layer[1](y) + y
            elif kind == "shared":
                conv = layer[0]
                x = conv(conv(x))  # one module, called twice: weights shared
            elif kind == "bn_conv":
                x = layer[1](layer[0](x))
            elif kind in ("bn", "act"):
                x = layer(x)
            elif kind == "functional":
                w, b = self.fweights[fw], self.fweights[fw + 1]
                fw += 2
                y = _FCONV[self.dims](
                    x, w, b if s["bias"] else None, padding=s["pad"], groups=s["groups"]
                )
                bn = layer[0]
                x = F.batch_norm(
                    y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
                )
            elif kind == "output":
                extra.append(x)  # an intermediate value also returned
            elif kind == "head":
                x = x.flatten(2).mean(-1)
                x = layer[1](layer[0](x))
            elif kind in ("repvgg", "acnet", "dbb"):
                x = sum_branches(layer, x)
            elif kind == "inplace":
                x = _inplace(s, layer, x)
            elif kind == "shape":
                x = _shape_op(s["op"], x)
            elif kind == "view_head":
                x = x.view(x.shape[0], -1)  # the batch size read at run time
                x = layer[1](layer[0](x))
        return (x, *extra) if extra else x


def _conv(dims: int, s: dict[str, Any]) -> nn.Module:
    """A layer spec's convolution: for kind ``convT`` a ConvTranspose (with its output padding),
    else a Conv (with its padding mode where the kind draws one); stride and dilation are 1 where
    the kind draws none (``bn_conv``)."""
    transposed = s["kind"] == "convT"
    if transposed:
        extra = {"output_padding": s["opad"]}
    else:
        extra = {"padding_mode": s.get("pmode", "zeros")}
    return (_CONVT if transposed else _CONV)[dims](
        s["cin"],
        s["cout"],
        s["k"],
        stride=s.get("stride", 1),
        padding=s["pad"],
        dilation=s.get("dil", 1),
        groups=s["groups"],
        bias=s["bias"],
        **extra,
    )


def sum_branches(block: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    """The sum of a multi-branch block's branches (the identity branch is a BatchNorm of x)."""
    y = None
    for branch in block.values():
        out = branch(x)
        y = out if y is None else y + out
    return y


def _inplace(s: dict[str, Any], layer: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """conv -> BN with an in-place op on a fresh intermediate, its result used or not.

    ``where="conv"``: on the conv output, before the BN (``v.mul_(s); bn(v)``: the BN reads the
    mutated tensor, so folding the BN into the conv must see the op); ``where="bn"``: after it.
    ``use_result=False`` writes the op as a statement whose value is unused (its effect is not).
    """
    conv, bn, operand = layer[0], layer[1], layer[2].value
    v = conv(x)
    if s["where"] == "bn":
        v = bn(v)
    op, use = s["op"], s["use_result"]
    if op == "mul_":
        r = v.mul_(operand if s["per_channel"] else 1.5)
    elif op == "add_":
        r = v.add_(operand if s["per_channel"] else -0.25)
    elif op == "relu_":
        r = torch.relu_(v)
    elif op == "method_relu_":
        r = v.relu_()
    elif op == "F.relu":
        r = F.relu(v, inplace=True)
    elif op == "iadd":  # ``v += c``: a statement; FX records operator.iadd
        v += operand
        r = v
    else:
        raise ValueError(op)
    v = r if use else v
    if s["where"] == "conv":
        v = bn(v)
    return v


def _shape_op(op: str, x: torch.Tensor) -> torch.Tensor:
    """Ops that read the input's shape at run time (traced as size/getitem nodes)."""
    if op == "roundtrip":  # flatten the spatial dims and back, through sizes read at run time
        y = x.reshape(x.size(0), x.size(1), -1)
        return y.view(x.shape)
    if op == "cat_ones":  # a tensor made from the runtime shape, concatenated on channels
        ones = x.new_ones(x.shape)[:, :1]
        return torch.cat([x, ones], 1)
    if op == "zeros_like_shape":
        return x + x.new_zeros(x.shape)
    if op == "scale_by_size":  # a Python number computed from the shape at run time
        return x * (1.0 / x.shape[-1])
    raise ValueError(op)


def _make_case(
    ints,
    pick,
    seed: int,
    max_layers: int,
    kinds: Sequence[str] = BASIC_KINDS,
    dtype: torch.dtype = torch.float32,
    max_size: int = 12,
) -> CNNCase:
    dims = pick([2, 2, 2, 1, 3])
    cin = ints(1, 6)
    size = ints(3, min(6, max_size)) if dims == 3 else ints(4, max(4, max_size))
    batch = ints(1, 3)
    spec = build_spec(ints, pick, dims, cin, size, max_layers, kinds)
    model = _RandomCNN(spec, dims, seed).eval().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cin, *([size] * dims), generator=gen).to(dtype)
    return CNNCase(model, (x,), spec, dims)


def random_cnn(
    seed: int,
    *,
    max_layers: int = 6,
    kinds: Sequence[str] = BASIC_KINDS,
    dtype: torch.dtype = torch.float32,
    max_size: int = 12,
) -> CNNCase:
    """A random CNN from a seed (no Hypothesis needed).

    ``kinds=EXTENDED_KINDS`` adds multi-branch blocks, in-place ops and runtime-shape ops (see
    :func:`random_cnns`); ``dtype`` casts the model and its inputs; ``max_size`` bounds the
    spatial size of 1d/2d inputs (3d inputs are at most 6 wide).
    """
    rng = random.Random(seed)
    return _make_case(rng.randint, rng.choice, seed, max_layers, kinds, dtype, max_size)


def random_cnns(
    max_layers: int = 6,
    *,
    kinds: Sequence[str] = BASIC_KINDS,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
) -> Any:
    """Hypothesis strategy of :class:`CNNCase`: random CNNs with the structures passes get wrong.

    Conv1d/2d/3d and ConvTranspose (groups, depthwise, stride, dilation, padding, output
    padding, bias or not), BatchNorm with random running statistics in eval mode (affine or
    not, with or without running stats), BN before a conv (zero or reflect/replicate padding),
    functional ``F.conv`` + ``F.batch_norm``, activations and dropout, residual adds, a conv
    whose output has two users, one conv module called twice (shared weights), intermediate
    values returned as extra outputs, and a Linear + BatchNorm1d head.

    ``kinds=EXTENDED_KINDS`` also draws RepVGG / ACNet / DBB training-time blocks (parallel
    conv+BN branches, a BN identity branch, 1x1 -> kxk and 1x1 -> avg-pool branches), in-place
    ops on intermediates (``mul_``, ``add_``, ``relu_``, ``+=``; before or after the BN; the
    result used or an unused statement), ops on shapes read at run time (``reshape(x.size(0),
    ...)``, ``new_ones(x.shape)``) and a ``view(x.shape[0], -1)`` head. ``dtypes`` are drawn
    per case (the model and its inputs cast to it). For the families graphopt must refuse or
    convert (in-place updates of the input, hooks, ONNX input) see :func:`fuzz_case`.
    """
    from hypothesis import strategies as st

    @st.composite
    def strategy(draw: Any) -> CNNCase:
        def ints(lo: int, hi: int) -> int:
            return draw(st.integers(lo, hi))

        def pick(options: list) -> Any:
            return draw(st.sampled_from(options))

        seed = draw(st.integers(0, 2**16))
        dtype = pick(list(dtypes)) if len(dtypes) > 1 else dtypes[0]
        return _make_case(ints, pick, seed, max_layers, kinds, dtype)

    return strategy()

"""Public helpers for unit-testing passes — graphopt's own tests use them, and so can yours.

    from graphopt.testing import assert_pass_preserves, random_cnns, run_pass, verify_rewrite

    def test_my_pass_keeps_numbers():
        assert_pass_preserves("my-pass", model, (x,))          # contract from the pass itself

    @given(random_cnns())
    def test_my_pass_on_random_cnns(case):
        assert_pass_preserves(MyPass(), case.model, case.inputs)

    def test_my_pass_rewrites():
        verify_rewrite("my-pass", Before(), Expected(), (x,))    # canonical IR equality

``assert_pass_preserves`` checks what a pass promises: the graph lints, the outputs stay within
the pass's declared :class:`Numerics` on the given inputs (and on a second batch size), and
``modified`` is honest (the graph changed exactly when the pass says so).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt import verify
from graphopt.capture import annotate_shapes, capture
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.pipeline import get_pass

__all__ = [
    "CNNCase",
    "assert_pass_preserves",
    "random_bn",
    "random_cnn",
    "random_cnns",
    "random_input",
    "run_pass",
    "seeded",
    "verify_rewrite",
]


def _as_pass(p: str | Pass | type[Pass], options: dict[str, Any]) -> Pass:
    if isinstance(p, Pass):
        if options:
            raise TypeError("options go with a pass name or class, not an instance")
        return p
    cls = get_pass(p) if isinstance(p, str) else p
    return cls(**options)


def _as_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """A fresh captured graph (the model itself is never touched)."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        annotate_shapes(gm, example_inputs)
        return gm
    return capture(model, tuple(example_inputs)).graph


def run_pass(
    p: str | Pass | type[Pass],
    model: nn.Module,
    example_inputs: Sequence[Any],
    ctx: PassContext | None = None,
    **options: Any,
) -> tuple[fx.GraphModule, PassResult]:
    """Capture ``model``, run one pass on it (no verification) and return (graph, result)."""
    gm = _as_graph(model, example_inputs)
    result = _as_pass(p, options).run(gm, ctx or PassContext(sample_inputs=tuple(example_inputs)))
    result.graph.graph.lint()
    result.graph.recompile()
    return result.graph, result


def assert_pass_preserves(
    p: str | Pass | type[Pass],
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    more_inputs: Sequence[Sequence[Any]] = (),
    expect_modified: bool | None = None,
    ctx: PassContext | None = None,
    **options: Any,
) -> PassResult:
    """Run pass ``p`` on ``model`` and assert that it kept its numeric contract.

    Checked on ``example_inputs`` and each of ``more_inputs`` (e.g. another batch size):
    outputs within the pass's ``numerics`` of the original model's outputs; ``modified`` true
    exactly when the graph (structure or weights) changed; ``expect_modified`` if given.
    Returns the pass result for further assertions on statistics.
    """
    pass_ = _as_pass(p, options)
    inputs = tuple(example_inputs)
    before_gm = _as_graph(model, inputs)
    before_print = verify.fingerprint(before_gm)
    reference_model = copy.deepcopy(model).eval()
    gm, result = run_pass(pass_, before_gm, inputs, ctx)
    changed = verify.fingerprint(gm) != before_print
    assert result.modified == changed, (
        f"pass {pass_} reported modified={result.modified} but the graph "
        f"{'changed' if changed else 'did not change'}; stats: {dict(result.stats)}"
    )
    if expect_modified is not None:
        assert result.modified == expect_modified, (
            f"expected pass {pass_} to {'change' if expect_modified else 'leave'} the graph; "
            f"stats: {dict(result.stats)}\n{verify.canonical_ir(gm)}"
        )
    for args in (inputs, *[tuple(m) for m in more_inputs]):
        ref = verify.run_module(reference_model, args)
        out = verify.run_module(gm, args)
        cmp = verify.compare(ref, out, pass_.numerics)
        assert cmp.ok, (
            f"pass {pass_} broke its contract {pass_.numerics} on inputs of shape "
            f"{[tuple(a.shape) for a in args]}: {cmp.describe()}\n"
            f"stats: {dict(result.stats)}\n{verify.canonical_ir(gm)}"
        )
    return result


def verify_rewrite(
    p: str | Pass | type[Pass],
    before: nn.Module,
    expected: nn.Module,
    example_inputs: Sequence[Any],
    **options: Any,
) -> PassResult:
    """Assert that pass ``p`` turns ``before`` into ``expected`` (canonical IR, constants elided)
    and that the rewrite keeps the pass's numeric contract."""
    result = assert_pass_preserves(p, before, example_inputs, **options)
    got = verify.canonical_ir(result.graph)
    want = verify.canonical_ir(_as_graph(expected, tuple(example_inputs)))
    assert got == want, "the rewrite differs from the expected graph:\n" + verify.ir_diff(
        want, got
    ).replace("--- before", "--- expected").replace("+++ after", "+++ got")
    return result


# ------------------------------------------------------------------------------------------------
# random CNNs


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
_ACTS = {
    "relu": nn.ReLU,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
    "identity": nn.Identity,
    "dropout": lambda: nn.Dropout(0.3),
}


def seeded(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator: tests draw from their own, never from the global RNG."""
    return torch.Generator().manual_seed(seed)


def random_bn(cls: type[nn.Module], channels: int, seed: int = 0, **kwargs: Any) -> nn.Module:
    """``cls(channels, **kwargs)`` with random statistics and affine parameters (never identity)."""
    bn = cls(channels, **kwargs)
    randomize_bn(bn, seeded(seed))
    return bn


def random_input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` from its own generator."""
    return torch.randn(shape, generator=seeded(seed))


def randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    """Random running statistics and affine parameters: never the identity BatchNorm."""
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 1.5 + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)


class _RandomCNN(nn.Module):
    """Interprets a spec (a list of layer dicts); FX unrolls the loop when tracing."""

    def __init__(self, spec: list[dict[str, Any]], dims: int, seed: int) -> None:
        super().__init__()
        self.spec = spec
        self.dims = dims
        self.layers = nn.ModuleList()
        self.fweights = nn.ParameterList()
        gen = torch.Generator().manual_seed(seed)
        for s in spec:
            self.layers.append(self._make(s, gen))
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                randomize_bn(m, gen)

    def _make(self, s: dict[str, Any], gen: torch.Generator) -> nn.Module:
        d = self.dims
        kind = s["kind"]
        if kind in ("conv", "residual", "branch", "shared"):
            conv = _CONV[d](
                s["cin"],
                s["cout"],
                s["k"],
                stride=s["stride"],
                padding=s["pad"],
                dilation=s["dil"],
                groups=s["groups"],
                bias=s["bias"],
            )
            if kind == "shared":
                return nn.ModuleList([conv])
            layers = [conv, _BN[d](s["cout"])]
            return nn.ModuleList(layers)
        if kind == "convT":
            conv = _CONVT[d](
                s["cin"],
                s["cout"],
                s["k"],
                stride=s["stride"],
                padding=s["pad"],
                output_padding=s["opad"],
                groups=s["groups"],
                bias=s["bias"],
                dilation=s["dil"],
            )
            return nn.ModuleList([conv, _BN[d](s["cout"])])
        if kind == "bn":
            return _BN[d](s["c"], affine=s["affine"], track_running_stats=s["stats"])
        if kind == "bn_conv":
            return nn.ModuleList(
                [
                    _BN[d](s["cin"]),
                    _CONV[d](
                        s["cin"],
                        s["cout"],
                        s["k"],
                        padding=s["pad"],
                        groups=s["groups"],
                        bias=s["bias"],
                        padding_mode=s["pmode"],
                    ),
                ]
            )
        if kind == "act":
            return _ACTS[s["act"]]()
        if kind == "functional":
            shape = (s["cout"], s["cin"] // s["groups"], *([s["k"]] * d))
            self.fweights.append(nn.Parameter(torch.randn(shape, generator=gen) * 0.3))
            self.fweights.append(nn.Parameter(torch.randn(s["cout"], generator=gen) * 0.1))
            bn = _BN[d](s["cout"])
            return nn.ModuleList([bn])
        if kind == "head":
            return nn.ModuleList(
                [nn.Linear(s["cin"], s["cout"], bias=s["bias"]), nn.BatchNorm1d(s["cout"])]
            )
        if kind == "output":
            return nn.Identity()  # a placeholder: forward() only records x, calls nothing
        raise ValueError(kind)

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
        return (x, *extra) if extra else x


def _out_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _channels(ints: Callable[[int, int], int], groups: int) -> int:
    """An output channel count that ``groups`` divides, at most 8 (or ``groups``)."""
    return groups * ints(1, max(1, 8 // groups))


def _build_spec(
    ints: Callable[[int, int], int],
    pick: Callable[[list], Any],
    dims: int,
    cin: int,
    size: int,
    max_layers: int,
) -> list[dict[str, Any]]:
    spec: list[dict[str, Any]] = []
    c, n = cin, size
    kinds = [
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
    ]
    for _ in range(ints(1, max_layers)):
        kind = pick(kinds)
        divisors = [g for g in (1, 2, 4) if c % g == 0]
        if kind in ("conv", "branch"):
            groups = pick(divisors + [c])
            cout = _channels(ints, groups)
            k, stride, dil = pick([1, 2, 3]), pick([1, 2]), pick([1, 2])
            pad = ints(0, k // 2 + 1)
            if kind == "branch":  # the add needs the conv to keep the shape
                cout, stride, k, dil = c, 1, pick([1, 3]), 1
                pad = k // 2
                groups = pick([g for g in divisors if cout % g == 0])
            if _out_len(n, k, stride, pad, dil) < 1:
                continue
            spec.append(
                dict(
                    kind=kind,
                    cin=c,
                    cout=cout,
                    k=k,
                    stride=stride,
                    pad=pad,
                    dil=dil,
                    groups=groups,
                    bias=pick([True, False]),
                )
            )
            c, n = cout, _out_len(n, k, stride, pad, dil)
        elif kind == "convT":
            groups = pick(divisors)
            cout = _channels(ints, groups)
            k, stride, dil = pick([1, 2, 3]), pick([1, 2]), pick([1, 2])
            pad = ints(0, (dil * (k - 1)) // 2)
            opad = ints(0, max(stride, dil) - 1) if stride > 1 else 0
            opad = min(opad, stride - 1) if dil == 1 else min(opad, max(stride, dil) - 1)
            out = (n - 1) * stride - 2 * pad + dil * (k - 1) + opad + 1
            if out < 1 or out > 24:
                continue
            spec.append(
                dict(
                    kind="convT",
                    cin=c,
                    cout=cout,
                    k=k,
                    stride=stride,
                    pad=pad,
                    opad=opad,
                    dil=dil,
                    groups=groups,
                    bias=pick([True, False]),
                )
            )
            c, n = cout, out
        elif kind in ("residual", "shared"):
            k = pick([1, 3])
            groups = pick(divisors)
            spec.append(
                dict(
                    kind=kind,
                    cin=c,
                    cout=c,
                    k=k,
                    stride=1,
                    pad=k // 2,
                    dil=1,
                    groups=groups,
                    bias=pick([True, False]),
                )
            )
        elif kind == "bn":
            # without running stats BN normalises over batch x space: with one pixel, a batch of
            # one would raise, so keep those models valid for every batch size
            spec.append(
                dict(
                    kind="bn",
                    c=c,
                    affine=pick([True, True, False]),
                    stats=pick([True, True, True, False]) if n > 1 else True,
                )
            )
        elif kind == "act":
            spec.append(dict(kind="act", act=pick(list(_ACTS))))
        elif kind == "bn_conv":
            k = pick([1, 3])
            pad = pick([0, k // 2])
            groups = pick(divisors)
            cout = _channels(ints, groups)
            if _out_len(n, k, 1, pad, 1) < 1:
                continue
            spec.append(
                dict(
                    kind="bn_conv",
                    cin=c,
                    cout=cout,
                    k=k,
                    pad=pad,
                    groups=groups,
                    bias=pick([True, False]),
                    pmode=pick(["zeros", "zeros", "reflect", "replicate"])
                    if pad and n > pad
                    else "zeros",
                )
            )
            c, n = cout, _out_len(n, k, 1, pad, 1)
        elif kind == "functional":
            k = pick([1, 3])
            groups = pick(divisors)
            cout = _channels(ints, groups)
            pad = pick([0, k // 2])
            if _out_len(n, k, 1, pad, 1) < 1:
                continue
            spec.append(
                dict(
                    kind="functional",
                    cin=c,
                    cout=cout,
                    k=k,
                    pad=pad,
                    groups=groups,
                    bias=pick([True, False]),
                )
            )
            c, n = cout, _out_len(n, k, 1, pad, 1)
        elif kind == "output" and spec:
            spec.append(dict(kind="output"))
    if pick([True, False]):
        spec.append(dict(kind="head", cin=c, cout=ints(1, 6), bias=pick([True, False])))
    return spec


def _make_case(ints, pick, seed: int, max_layers: int) -> CNNCase:
    dims = pick([2, 2, 2, 1, 3])
    cin = ints(1, 6)
    size = ints(3, 6) if dims == 3 else ints(4, 12)
    batch = ints(1, 3)
    spec = _build_spec(ints, pick, dims, cin, size, max_layers)
    model = _RandomCNN(spec, dims, seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cin, *([size] * dims), generator=gen)
    return CNNCase(model, (x,), spec, dims)


def small_conv_net(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Conv-BN-ReLU (random BN statistics), global pooling, a linear classifier, and an input
    of shape (1, 3, 16, 16): the smallest model that exercises a backend's usual operators."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    randomize_bn(model[1], torch.Generator().manual_seed(seed))
    return model, torch.randn(1, 3, 16, 16)


def random_cnn(seed: int, *, max_layers: int = 6) -> CNNCase:
    """A random CNN from a seed (no Hypothesis needed)."""
    rng = random.Random(seed)
    return _make_case(rng.randint, rng.choice, seed, max_layers)


def random_cnns(max_layers: int = 6) -> Any:
    """Hypothesis strategy of :class:`CNNCase`: random CNNs with the structures passes get wrong.

    Conv1d/2d/3d and ConvTranspose (groups, depthwise, stride, dilation, padding, output
    padding, bias or not), BatchNorm with random running statistics in eval mode (affine or
    not, with or without running stats), BN before a conv (zero or reflect/replicate padding),
    functional ``F.conv`` + ``F.batch_norm``, activations and dropout, residual adds, a conv
    whose output has two users, one conv module called twice (shared weights), intermediate
    values returned as extra outputs, and a Linear + BatchNorm1d head.
    """
    from hypothesis import strategies as st

    @st.composite
    def strategy(draw: Any) -> CNNCase:
        def ints(lo: int, hi: int) -> int:
            return draw(st.integers(lo, hi))

        def pick(options: list) -> Any:
            return draw(st.sampled_from(options))

        seed = draw(st.integers(0, 2**16))
        return _make_case(ints, pick, seed, max_layers)

    return strategy()

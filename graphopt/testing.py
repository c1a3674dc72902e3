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
``modified`` is honest (the graph changed exactly when the pass says so); with
``inference_mode=True`` it checks it all again with the pass run under
``torch.inference_mode()``. The helpers work when called under ``no_grad()`` or
``inference_mode()``.

``fuzz(seeds, pipeline)`` runs whole pipelines on random models of several families (float32,
float64, float16/bfloat16, an int64 input, in-place updates of the input, hooks, ONNX input)
and judges each on a fresh input of another batch size under the exact contract::

    report = fuzz(range(1000), "fold-conv-bn,reparameterize,eliminate-dead-code")
    assert not report.bad(), report.summary()    # each failure: seed, family, mode, repro
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt import verify
from graphopt._util import first_line
from graphopt.capture import annotate_shapes, capture
from graphopt.pass_manager import Pass, PassContext, PassResult
from graphopt.pipeline import get_pass

__all__ = [
    "BASIC_KINDS",
    "EXTENDED_KINDS",
    "CNNCase",
    "FAMILIES",
    "FULL_EXACT_PIPELINE",
    "FuzzCase",
    "FuzzFailure",
    "FuzzReport",
    "UnitCostBackend",
    "check_case",
    "fuzz",
    "fuzz_case",
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
    inference_mode: bool = False,
    **options: Any,
) -> PassResult:
    """Run pass ``p`` on ``model`` and assert that it kept its numeric contract.

    Checked on ``example_inputs`` and each of ``more_inputs`` (e.g. another batch size):
    outputs within the pass's ``numerics`` of the original model's outputs; ``modified`` true
    exactly when the graph (structure or weights) changed; ``expect_modified`` if given.
    ``inference_mode=True`` checks all of it a second time with the pass run under
    ``torch.inference_mode()`` (how most inference code runs), where it must also do what it
    did outside (same ``modified`` and statistics). Works when called under ``no_grad()`` or
    ``inference_mode()`` itself. Returns the pass result for further assertions on statistics.
    """
    if inference_mode and not torch.is_inference_mode_enabled():
        kwargs = dict(more_inputs=more_inputs, expect_modified=expect_modified, ctx=ctx)
        result = assert_pass_preserves(p, model, example_inputs, **kwargs, **options)
        with torch.inference_mode():
            again = assert_pass_preserves(p, model, example_inputs, **kwargs, **options)
        assert (again.modified, dict(again.stats)) == (result.modified, dict(result.stats)), (
            f"pass {p} did something else under torch.inference_mode(): modified="
            f"{again.modified}, stats {dict(again.stats)}; outside it: modified="
            f"{result.modified}, stats {dict(result.stats)}"
        )
        return result
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
    *,
    inference_mode: bool = False,
    **options: Any,
) -> PassResult:
    """Assert that pass ``p`` turns ``before`` into ``expected`` (canonical IR, constants elided)
    and that the rewrite keeps the pass's numeric contract (``inference_mode``: see
    :func:`assert_pass_preserves`)."""
    result = assert_pass_preserves(
        p, before, example_inputs, inference_mode=inference_mode, **options
    )
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
        if kind in ("repvgg", "acnet", "dbb"):
            return self._make_multibranch(s)
        if kind == "inplace":
            conv = _CONV[d](s["cin"], s["cout"], s["k"], padding=s["k"] // 2, bias=s["bias"])
            scale = nn.Module()  # holds the per-channel operand as a buffer
            scale.register_buffer("value", torch.rand(s["cout"], *[1] * d, generator=gen) + 0.5)
            return nn.ModuleList([conv, _BN[d](s["cout"]), scale])
        if kind == "shape":
            return nn.Identity()  # forward() does the shape arithmetic itself
        if kind == "view_head":
            return nn.ModuleList(
                [nn.Linear(s["cin"], s["cout"], bias=s["bias"]), nn.BatchNorm1d(s["cout"])]
            )
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


def _out_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _channels(ints: Callable[[int, int], int], groups: int) -> int:
    """An output channel count that ``groups`` divides, at most 8 (or ``groups``)."""
    return groups * ints(1, max(1, 8 // groups))


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


def _build_spec(
    ints: Callable[[int, int], int],
    pick: Callable[[list], Any],
    dims: int,
    cin: int,
    size: int,
    max_layers: int,
    kinds: Sequence[str] = BASIC_KINDS,
) -> list[dict[str, Any]]:
    spec: list[dict[str, Any]] = []
    c, n = cin, size
    kinds = list(kinds)
    extended = any(k not in BASIC_KINDS for k in kinds)
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
        elif kind in ("repvgg", "acnet", "dbb"):
            if kind == "acnet" and dims != 2:
                kind = "repvgg"
            groups = pick(divisors)
            cout = _channels(ints, groups)
            stride = pick([1, 1, 2])
            k = pick([3, 3, 1, 5]) if kind == "repvgg" else pick([3, 3, 1])
            # (avg_pool3d refuses an input smaller than its kernel, padding or not)
            if _out_len(n, k, stride, k // 2, 1) < 1 or (kind == "dbb" and n < k):
                continue
            spec.append(
                dict(
                    kind=kind,
                    cin=c,
                    cout=cout,
                    k=k,
                    stride=stride,
                    groups=groups,
                    bias=pick([False, False, True]),
                    identity=cout == c and stride == 1 and pick([True, True, False]),
                )
            )
            c, n = cout, _out_len(n, k, stride, k // 2, 1)
        elif kind == "inplace":
            cout = ints(1, 8)
            spec.append(
                dict(
                    kind="inplace",
                    cin=c,
                    cout=cout,
                    k=pick([1, 3]),
                    bias=pick([True, False]),
                    where=pick(["conv", "bn"]),
                    op=pick(["mul_", "mul_", "add_", "relu_", "method_relu_", "F.relu", "iadd"]),
                    per_channel=pick([True, False]),
                    use_result=pick([True, False]),
                )
            )
            c = cout
        elif kind == "shape":
            op = pick(["roundtrip", "cat_ones", "zeros_like_shape", "scale_by_size"])
            spec.append(dict(kind="shape", op=op))
            c += op == "cat_ones"
    if extended and pick([True, False, False]):  # a head that reads the batch size at run time
        spec.append(
            dict(kind="view_head", cin=c * n**dims, cout=ints(1, 6), bias=pick([True, False]))
        )
    elif pick([True, False]):
        spec.append(dict(kind="head", cin=c, cout=ints(1, 6), bias=pick([True, False])))
    return spec


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
    spec = _build_spec(ints, pick, dims, cin, size, max_layers, kinds)
    model = _RandomCNN(spec, dims, seed).eval().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cin, *([size] * dims), generator=gen).to(dtype)
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


# ------------------------------------------------------------------------------------------------
# fuzzing: random models through capture and a whole pipeline, judged on fresh inputs

# family -> (weight in a profile, words one of which a refusal's message must contain; None:
# graphopt must optimize the model, a refusal is a defect)
FAMILIES: dict[str, tuple[int, tuple[str, ...] | None]] = {
    "cnn": (40, None),  # float32, EXTENDED_KINDS
    "float64": (14, None),
    "half": (4, None),  # float16 or bfloat16
    "int-input": (5, None),  # a second, int64 input (an embedding index)
    "inplace-input": (8, ("in-place", "in place", "inplace", "mutat", "modif")),
    "hooks": (8, ("hook",)),  # forward hooks / pre-hooks on submodules or the model
    "onnx": (4, None),  # exported to ONNX with BatchNorm unfolded, the bytes given to graphopt
    # forward updates a buffer in place: to be refused (or kept, state and all)
    "state-update": (3, ("buffer", "state", "in place", "in-place", "mutat", "updat")),
    # not drawn by default (weight 0) until graphopt handles it; fuzz(..., families=[...])
    "export-fallback": (0, None),  # FX cannot trace it (item assignment): torch.export
}
# grad modes capture and the pipeline run under; "inference_built": the model and its inputs
# were made under inference_mode (inference tensors), graphopt runs outside it
_GRAD_MODES = ("grad", "no_grad", "inference_mode", "inference_mode", "inference_built")
# the full exact pipeline: every exact pass, merge-convs timed by UnitCostBackend
FULL_EXACT_PIPELINE = (
    "remove-identity,fold-constants,fold-conv-bn,reparameterize,merge-convs{cache=false},"
    "equalize-layers,eliminate-dead-code"
)


@dataclass
class FuzzCase:
    """One fuzz model: what goes to :func:`graphopt.capture.capture` (``source``: the module,
    or ONNX bytes), the reference module, example inputs and fresh inputs of another batch
    size, and the grad mode that capture and the pipeline run under."""

    seed: int
    family: str
    model: nn.Module
    source: Any
    inputs: tuple[torch.Tensor, ...]
    other_inputs: tuple[torch.Tensor, ...]
    mode: str  # "grad" | "no_grad" | "inference_mode" | "inference_built"
    spec: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def __repr__(self) -> str:
        body = "\n  ".join(str(s) for s in self.spec)
        shapes = [f"{tuple(x.shape)} {x.dtype}" for x in self.inputs]
        return (
            f"FuzzCase(seed={self.seed}, family={self.family!r}, mode={self.mode!r}, "
            f"inputs={shapes}{', ' + self.note if self.note else ''},\n  {body})"
        )


class _MutatesInput(nn.Module):
    """Updates its input in place, then runs the CNN: capture must refuse (or keep it)."""

    def __init__(self, inner: nn.Module, op: str) -> None:
        super().__init__()
        self.inner, self.op = inner, op
        self.act = nn.ReLU(inplace=True)
        self.alias = nn.Identity()

    def forward(self, x: torch.Tensor) -> Any:
        if self.op == "mul_":
            x.mul_(2.0)
        elif self.op == "add_":
            x.add_(0.5)
        elif self.op == "iadd":
            x += 1.0
        elif self.op == "relu_":
            torch.relu_(x)
        elif self.op == "slice":
            x[:, :1].mul_(-1.0)
        elif self.op == "relu_module":  # nn.ReLU(inplace=True) on the input
            x = self.act(x)
        elif self.op == "via_identity":  # an alias of the input (Identity returns x itself)
            self.alias(x).mul_(3.0)
        return self.inner(x)


class _UpdatesState(nn.Module):
    """Counts its calls in a buffer, updated in place in forward, and scales its input by it:
    graphopt must refuse, or return a graph whose state is the model's (not advanced by the
    runs graphopt made itself)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> Any:
        self.calls.add_(1.0)
        return self.inner(x * (1.0 + 0.1 * self.calls).to(x.dtype))


class _NeedsExport(nn.Module):
    """Item assignment, which symbolic tracing cannot capture: capture falls back to
    torch.export (the graph must still take other batch sizes, or capture must say it won't)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Any:
        y = x.clone()
        y[:, 0] = 0.5
        return self.inner(y)


class _WithIndex(nn.Module):
    """A CNN with a second, int64 input: an embedding row added to every position."""

    def __init__(self, inner: nn.Module, channels: int, dims: int, rows: int, seed: int) -> None:
        super().__init__()
        self.inner, self.dims = inner, dims
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(rows, channels, generator=gen))

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> Any:
        row = self.table[index]  # (N, C), gathered at run time
        return self.inner(x + row.view(index.shape[0], -1, *[1] * self.dims).to(x.dtype))


class _ScaleOutput:
    """A forward hook that changes the module's output."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # the model itself, returning extra outputs
            return tuple(o * self.scale for o in output)
        return output * self.scale


class _ShiftInput:
    """A forward pre-hook that changes the module's input."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        return (args[0] + self.shift, *args[1:])


class _Observe:
    """A forward hook that only observes (returns None): dropping it changes no output."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1


def _add_hooks(model: nn.Module, rng: random.Random) -> str:
    """Register 1-2 hooks on random submodules (or the model itself); returns where."""
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.modules.batchnorm._BatchNorm | nn.Linear)
    ]
    placed = []
    for _ in range(rng.randint(1, 2)):
        name, module = rng.choice([("<model>", model), *candidates])
        hook = rng.choice(["scale", "shift", "observe"])
        if hook == "scale":
            module.register_forward_hook(_ScaleOutput(rng.choice([2.0, -0.5])))
        elif hook == "shift":
            module.register_forward_pre_hook(_ShiftInput(rng.choice([1.0, -0.25])))
        else:
            module.register_forward_hook(_Observe())
        placed.append(f"{hook}@{name}")
    return "hooks=" + "+".join(placed)


def _fresh(x: torch.Tensor, batch: int, seed: int, rows: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *x.shape[1:])
    if x.dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(x.dtype)
    return torch.randint(0, max(rows, 1), shape, generator=gen).to(x.dtype)


def _onnx_bytes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """TorchScript export with BatchNorm kept as its own node and a dynamic batch axis."""
    import io
    import warnings

    names = [f"x{i}" for i in range(len(inputs))]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            f,
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=names,
            dynamic_axes={n: {0: "N"} for n in names},
        )
    return f.getvalue()


def fuzz_case(
    seed: int, family: str | None = None, *, max_layers: int = 5, mode: str | None = None
) -> FuzzCase:
    """The fuzz model of ``seed`` (the family and grad mode drawn from the seed unless given).

    A random CNN of :data:`EXTENDED_KINDS`, then per family (:data:`FAMILIES`): ``cnn``
    (float32), ``float64``, ``half`` (float16 or bfloat16), ``int-input`` (a second, int64
    input indexing an embedding), ``inplace-input`` (``x.mul_(2)``, ``x += 1``, ``relu_``, a
    slice or an alias of the input updated in place: to be refused), ``hooks`` (forward hooks
    and pre-hooks that change values or only observe, on submodules or the model: to be
    refused or kept), ``onnx`` (the model exported with BatchNorm unfolded and a dynamic batch,
    the bytes given to capture), ``state-update`` (a buffer updated in place in forward: to be
    refused) and ``export-fallback`` (see :class:`_NeedsExport`; drawn only when named).

    Every model is tiny (at most 8 channels, 8 wide), so one costs milliseconds. The same seed
    always gives the same model, inputs, family and grad mode: a failure's seed is its repro.
    """
    rng = random.Random(seed * 7919 + 17)
    names = list(FAMILIES)
    drawn = rng.choices(names, weights=[FAMILIES[f][0] for f in names])[0]
    family = family or drawn  # drawn either way: a given family changes nothing else
    if family not in FAMILIES:
        raise ValueError(f"unknown fuzz family {family!r}; use one of {', '.join(FAMILIES)}")
    drawn_mode = rng.choice(_GRAD_MODES)
    mode = mode or drawn_mode  # drawn either way, like the family
    if mode not in _GRAD_MODES:
        raise ValueError(f"unknown grad mode {mode!r}; use one of {', '.join(set(_GRAD_MODES))}")
    if family == "state-update" and mode == "inference_built":
        mode = "inference_mode"  # torch forbids updating an inference-mode buffer outside it
    dtype = {"float64": torch.float64, "half": rng.choice([torch.float16, torch.bfloat16])}.get(
        family, torch.float32
    )
    # a model this family cannot express (no float16 avg_pool3d on CPU, a BatchNorm without
    # running statistics that the ONNX exporter refuses) is drawn again from a derived seed
    onnx_bytes = None
    for attempt in range(8):
        kinds = EXTENDED_KINDS
        if attempt >= 4:  # what the exporter refuses most: shape ops, BN without statistics
            kinds = tuple(k for k in EXTENDED_KINDS if k not in ("shape", "bn"))
        with torch.inference_mode(mode == "inference_built"):
            case = random_cnn(
                seed + 1_000_003 * attempt,
                max_layers=max_layers,
                kinds=kinds,
                dtype=dtype,
                max_size=8,
            )
        if family not in ("half", "onnx"):  # float32/float64 models always run and trace
            break
        if family == "onnx" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
            for m in case.model.modules()
        ):
            continue  # the TorchScript exporter refuses batch statistics with a dynamic batch
        try:
            with torch.no_grad():
                case.model(*case.inputs)
            if family == "onnx":
                onnx_bytes = _onnx_bytes(case.model, case.inputs)
            break
        except Exception:  # noqa: BLE001 - any failure: draw another model
            continue
    model: nn.Module = case.model
    inputs = case.inputs
    batch = inputs[0].shape[0]
    other = (_fresh(inputs[0], batch + 2, seed + 2),)
    note = ""
    source: Any = model
    with torch.inference_mode(mode == "inference_built"):
        model, source, inputs, other, note = _wrap_for_family(
            family, model, inputs, other, case.dims, seed, rng, onnx_bytes
        )
    return FuzzCase(seed, family, model, source, inputs, other, mode, case.spec, note)


def _wrap_for_family(
    family: str,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    other: tuple[torch.Tensor, ...],
    dims: int,
    seed: int,
    rng: random.Random,
    onnx_bytes: bytes | None,
) -> tuple[nn.Module, Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], str]:
    """(model, what capture gets, inputs, other inputs, note) for ``family``."""
    batch = inputs[0].shape[0]
    note = ""
    source: Any = model
    if family == "inplace-input":
        op = rng.choice(["mul_", "add_", "iadd", "relu_", "slice", "relu_module", "via_identity"])
        model = source = _MutatesInput(model, op).eval()
        note = f"input op={op}"
    elif family == "hooks":
        note = _add_hooks(model, rng)
    elif family == "state-update":
        model = source = _UpdatesState(model).eval()
    elif family == "export-fallback":
        model = source = _NeedsExport(model).eval()
    elif family == "int-input":
        rows = rng.randint(2, 6)
        model = source = _WithIndex(model, inputs[0].shape[1], dims, rows, seed).eval()
        index = torch.randint(0, rows, (batch,), generator=torch.Generator().manual_seed(seed))
        inputs = (inputs[0], index)
        other = (other[0], _fresh(index, batch + 2, seed + 3, rows))
    elif family == "onnx":
        source = onnx_bytes if onnx_bytes is not None else _onnx_bytes(model, inputs)
    return model, source, inputs, other, note


class UnitCostBackend:
    """A deterministic stand-in for a timed backend, for merge-convs in fuzzing: every conv
    costs 1 ms (plus 1e-6 ms per weight), a kept residual add 0.25 ms. One conv always beats
    two, so every mergeable span is merged -- the most rewriting to check -- and the decisions
    do not depend on the machine's load. merge-convs asks a backend with an ``rpc`` device for
    ``measure()`` per unit instead of compiling and timing it here."""

    name = "fuzz-unit-cost"
    version = "1"
    rpc = "unit-cost-model"
    target = None

    def settings(self) -> dict[str, Any]:
        return {}

    def measure(self, module: nn.Module, inputs: Any, **_: Any) -> Any:
        from graphopt.backends.measure import Latency

        ms = 0.25 * bool(getattr(module, "add", False))
        for m in module.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                ms += 1.0 + 1e-6 * m.weight.numel()
        return Latency(ms, ms, ms, 1)


@dataclass
class FuzzFailure:
    """A bad outcome: enough to reproduce it (``fuzz([seed], pipeline)``)."""

    seed: int
    family: str
    outcome: str  # "mismatch" | "crash" | "unexpected-refusal" | "generator-error"
    message: str
    pipeline: str
    mode: str = ""
    spec: list[dict[str, Any]] = field(default_factory=list)

    def repro(self) -> str:
        modes = f", modes=[{self.mode!r}]" if self.mode else ""
        return (
            f"fuzz([{self.seed}], {self.pipeline!r}, families=[{self.family!r}]{modes})  "
            f"# the model: fuzz_case({self.seed}, {self.family!r}, mode={self.mode!r})"
        )

    def __str__(self) -> str:
        return f"seed {self.seed} [{self.family}, {self.mode}] {self.outcome}: {self.message}"


@dataclass
class FuzzReport:
    """Outcome counts of a fuzz run, per family, and every bad outcome with its seed.

    Outcomes: ``ok`` (optimized and equal under the exact contract), ``refused`` (a
    ``GraphoptError`` naming the reason, for a family graphopt must refuse), and the bad ones:
    ``mismatch`` (a different output, dtype, shape or side effect on the inputs, the caller's
    tensors changed, or a module left in training mode), ``crash`` (any exception that is not
    a ``GraphoptError``, also from running the returned graph), ``unexpected-refusal`` (a
    ``GraphoptError`` for a model graphopt should have optimized) and ``generator-error``
    (the fuzz model itself failed: a bug in this module).
    """

    pipeline: str
    counts: Counter = field(default_factory=Counter)
    by_family: dict[str, Counter] = field(default_factory=dict)
    failures: list[FuzzFailure] = field(default_factory=list)
    time_s: float = 0.0
    stats: Counter = field(default_factory=Counter)  # "<pass>:<key>" summed over the models

    BAD: ClassVar[tuple[str, ...]] = ("mismatch", "crash", "unexpected-refusal", "generator-error")

    @property
    def models(self) -> int:
        return sum(self.counts.values())

    def bad(self, *outcomes: str) -> list[FuzzFailure]:
        wanted = outcomes or self.BAD
        return [f for f in self.failures if f.outcome in wanted]

    def add(self, seed: int, family: str, outcome: str, message: str, case: Any = None) -> None:
        self.counts[outcome] += 1
        self.by_family.setdefault(family, Counter())[outcome] += 1
        if outcome in self.BAD:
            mode, spec = (case.mode, case.spec) if case is not None else ("", [])
            self.failures.append(
                FuzzFailure(seed, family, outcome, message, self.pipeline, mode, spec)
            )

    def summary(self, limit: int = 20) -> str:
        """Counts, then one line per family and distinct failure message (its first seeds and
        how many)."""
        lines = [
            f"{self.models} models through {self.pipeline!r} in {self.time_s:.1f} s: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        ]
        for family, counts in sorted(self.by_family.items()):
            lines.append(
                f"  {family:<14} " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            )
        groups: dict[tuple[str, str, str], list[FuzzFailure]] = {}
        for f in self.failures:
            groups.setdefault((f.outcome, f.family, _gist(f.message)), []).append(f)
        for (outcome, _, _), fs in list(groups.items())[:limit]:
            seeds = ",".join(str(f.seed) for f in fs[:5])
            lines.append(
                f"  {outcome} x{len(fs)} (seeds {seeds}) [{fs[0].family}, {fs[0].mode}]: "
                f"{fs[0].message}\n    repro: {fs[0].repro()}"
            )
        return "\n".join(lines)

    __str__ = summary


def _gist(message: str) -> str:
    """A failure message without its numbers, to group failures of one cause."""
    import re

    return re.sub(r"[-+]?\d[\d.e+-]*", "#", message)[:120]


class _Mode:
    """``grad`` (nothing), ``no_grad`` or ``inference_mode`` as a context manager."""

    def __init__(self, mode: str) -> None:
        self.ctx = {
            "inference_mode": torch.inference_mode,
            "no_grad": torch.no_grad,
        }.get(mode, torch.enable_grad)()

    def __enter__(self) -> None:
        self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)


def _error_line(exc: BaseException) -> str:
    return first_line(exc, with_type=True)[:400]


def _where(exc: BaseException) -> str:
    """The innermost graphopt frame of a traceback: where a raw exception came from."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/graphopt/" in f.filename]
    f = frames[-1] if frames else None
    return f" (at {f.filename.rsplit('/graphopt/', 1)[-1]}:{f.lineno} in {f.name})" if f else ""


def _run_both(
    model: nn.Module, gm: nn.Module, args: tuple[torch.Tensor, ...], mode: str
) -> tuple[str, str]:
    """('', '') when ``gm`` computes what ``model`` does on ``args`` (exact contract, dtypes,
    shapes, and the same updates of its inputs), else (outcome, reason)."""
    a = tuple(x.clone() for x in args)
    b = tuple(x.clone() for x in args)
    with _Mode(mode):
        try:
            ref = verify.flatten_outputs(model(*a))
        except Exception as exc:  # noqa: BLE001 - the fuzz model itself is broken
            return "generator-error", f"the original model raised: {_error_line(exc)}"
        try:
            out = verify.flatten_outputs(gm(*b))
        except Exception as exc:  # noqa: BLE001
            return "crash", f"the optimized graph raised: {_error_line(exc)}{_where(exc)}"
    if len(ref) != len(out):
        return "mismatch", f"{len(out)} outputs, the model has {len(ref)}"
    for i, (r, o) in enumerate(zip(ref, out, strict=True)):
        if r.dtype != o.dtype or r.shape != o.shape:
            return "mismatch", (
                f"output[{i}] is {o.dtype} {tuple(o.shape)}, the model's {r.dtype} {tuple(r.shape)}"
            )
    ref = [r.detach() for r in ref]
    out = [o.detach() for o in out]
    exact = verify.compare(ref, out, _exact())
    if not exact.ok:
        # the exact contract graphopt declares: rtol x max|out|, or 4x the model's own float32
        # rounding (against a float64 run) where that is larger; measured only when needed
        with _Mode(mode):
            rounding = verify.rounding_error(model, tuple(x.clone() for x in args), ref)
        exact = verify.compare(ref, out, _exact(), rounding=rounding)
    if not exact.ok:
        return "mismatch", f"outputs: {exact.describe()}"
    effects = verify.compare(list(a), list(b), _exact())
    if not effects.ok:
        return "mismatch", (
            f"the inputs after the call differ (an in-place update of an input lost or added): "
            f"{effects.describe()}"
        )
    return "", ""


def _exact() -> Any:
    from graphopt.pass_manager import Numerics

    return Numerics.exact()


# modules whose output depends on ``training``: left in training mode, the graph computes
# something else than the eval-mode model (BatchNorm with batch statistics, dropout)
_MODE_DEPENDENT = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.modules.instancenorm._InstanceNorm,
)


def check_case(
    fc: FuzzCase, manager: Any, backend: Any = None, stats: Counter | None = None
) -> tuple[str, str]:
    """Capture ``fc``, run ``manager`` (a strict :class:`PassManager`) on it and judge the
    result: ``(outcome, message)`` with the outcomes of :class:`FuzzReport`. The passes'
    statistics are added to ``stats`` as ``"<pass>:<key>"``."""
    from graphopt.errors import GraphoptError

    kept = tuple(x.clone() for x in fc.inputs)
    try:
        with _Mode(fc.mode):
            captured = capture(fc.source, fc.inputs)
            ctx = PassContext(sample_inputs=captured.example_inputs, backend=backend, strict=True)
            result = manager.run(captured.graph, ctx)
            gm = result.graph
        if stats is not None:
            for record in result.records:
                stats.update({f"{record.name}:{k}": v for k, v in record.stats.items()})
    except GraphoptError as exc:
        words = FAMILIES[fc.family][1]
        text = str(exc).lower()
        if words is not None and any(w in text for w in words):
            return "refused", _error_line(exc)
        return "unexpected-refusal", _error_line(exc)
    except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
        return "crash", _error_line(exc) + _where(exc)
    changed = [i for i, (x, y) in enumerate(zip(fc.inputs, kept, strict=True)) if not x.equal(y)]
    if changed:
        return "mismatch", f"graphopt changed the caller's example input(s) {changed} in place"
    training = [
        name or "<root>"
        for name, m in gm.named_modules()
        if m.training and (not name or isinstance(m, _MODE_DEPENDENT))
    ]
    if training:  # calling the graph may use batch statistics (and update them)
        return "mismatch", f"the returned graph has modules in training mode: {training[:3]}"
    for label, args, mode in (
        ("another batch size", fc.other_inputs, "no_grad"),
        ("another batch size", fc.other_inputs, "inference_mode"),
        ("the example inputs", fc.inputs, "no_grad"),
    ):
        outcome, why = _run_both(fc.model, gm, args, mode)
        if outcome:
            return outcome, f"{why} (on {label}, under {mode})"
    return "ok", ""


def fuzz(
    seeds: Iterable[int],
    pipeline: str | Sequence[Pass],
    *,
    families: Sequence[str] | None = None,
    backend: Any = None,
    max_layers: int = 5,
    modes: Sequence[str] | None = None,
) -> FuzzReport:
    """Run the fuzz models of ``seeds`` through capture and ``pipeline`` (strict) and judge each.

    >>> report = fuzz(range(200), "fold-conv-bn,reparameterize,eliminate-dead-code")
    >>> report.counts, report.bad()
    (Counter({'ok': 170, 'refused': 30}), [])

    ``pipeline`` is a pipeline string or a list of passes. ``families`` restricts the families (the family of seed ``s`` is then drawn among them,
    keyed by the seed); ``backend`` is what merge-convs times on (default: a unit-cost model,
    see :class:`UnitCostBackend`; pass an ONNX Runtime backend to time for real); ``modes``
    restricts the grad modes (``grad``, ``no_grad``, ``inference_mode``, ``inference_built``:
    to tell a defect of one mode from the others). The pass
    manager is built once: passes keep no state between runs.
    """
    import time

    from graphopt.pass_manager import PassManager

    manager = PassManager(pipeline, strict=True)
    backend = backend if backend is not None else UnitCostBackend()
    report = FuzzReport(manager.pipeline)
    start = time.perf_counter()
    names = list(families) if families else None
    for seed in seeds:
        family = None
        if names is not None:
            weights = [max(FAMILIES[f][0], 1) for f in names]  # weight 0: only when named
            family = random.Random(seed).choices(names, weights)[0]
        mode = random.Random(-seed).choice(list(modes)) if modes else None
        try:
            fc = fuzz_case(seed, family, max_layers=max_layers, mode=mode)
        except Exception as exc:  # noqa: BLE001
            report.add(seed, family or "?", "generator-error", _error_line(exc))
            continue
        outcome, message = check_case(fc, manager, backend, report.stats)
        report.add(seed, fc.family, outcome, message, fc)
    report.time_s = time.perf_counter() - start
    return report

"""Numeric comparison, canonical IR printing, IR diffs and graph fingerprints.

Canonical IR names values by position (``%0``, ``%1``...), prints modules by their type and
hyper-parameters instead of their attribute path, and elides constants to their dtype and shape,
so two graphs that compute the same thing in the same order print the same, whatever their
modules are called. It is what Before/Expected tests compare and what ``--print-ir`` shows.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

if TYPE_CHECKING:
    from graphopt.pass_manager import Numerics

_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
}


# ------------------------------------------------------------------------------------------------
# running and comparing


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (tensor, tuple, list, dict...) in a stable order."""
    leaves, _ = pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def run_module(module: torch.nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Run ``module(*inputs)`` without autograd and return its flattened output tensors."""
    with torch.no_grad():
        return [t.detach() for t in flatten_outputs(module(*inputs))]


@dataclass
class Comparison:
    """The result of comparing outputs against reference outputs under a numerics contract."""

    ok: bool
    metric: str
    measured: float  # worst value of ``metric`` over all outputs
    allowed: float  # the contract's bound for ``metric``
    output: str  # which output is the worst, e.g. "output[0]"
    details: dict[str, float] = field(default_factory=dict)  # max_abs, rel_max, cosine...

    def describe(self) -> str:
        if self.metric in ("dtype", "shape"):
            return (
                f"{self.metric} at {self.output}: expected {self.details.get('expected')}, got "
                f"{self.details.get('got')}: VIOLATED"
            )
        cmp = ">=" if self.metric in _HIGHER_IS_BETTER else "<="
        verdict = "ok" if self.ok else "VIOLATED"
        return (
            f"{self.metric} {self.measured:.3g} (allowed {cmp} {self.allowed:.3g}) "
            f"at {self.output}: {verdict}"
        )


_HIGHER_IS_BETTER = {"cosine", "top1"}


def _metrics(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    ref64 = ref.detach().double().flatten()
    out64 = out.detach().double().flatten()
    if ref64.numel() == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "rel_max": 0.0, "cosine": 1.0, "scale": 0.0}
    diff = (out64 - ref64).abs()
    scale = float(ref64.abs().max())
    max_abs = float(diff.max())
    denom = float(ref64.norm() * out64.norm())
    cosine = float(ref64 @ out64) / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return {
        "max_abs": max_abs,
        "mean_abs": float(diff.mean()),
        "rel_max": max_abs / scale if scale > 0 else max_abs,
        "cosine": cosine,
        "scale": scale,
    }


def _top1(ref: torch.Tensor, out: torch.Tensor) -> float:
    if ref.dim() == 0 or ref.shape[-1] < 2:
        return 1.0 if torch.equal(ref, out) else 0.0
    return float((ref.argmax(-1) == out.argmax(-1)).double().mean())


def exact_tolerance(ref: torch.Tensor, rtol: float | None = None) -> float:
    """The absolute error allowed for an ``exact`` rewrite of an output: float rounding only.

    ``rtol`` (default: by dtype) times the output's magnitude ``max|ref|`` (at least 1e-3 of a
    unit, so that an all-near-zero output is not held to a bound below rounding of its inputs).
    """
    if rtol is None:
        rtol = default_rtol(ref.dtype)
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    return rtol * max(scale, 1e-3)


# An exact rewrite computes the same function in float32 with other roundings: its distance to the
# original is at most the sum of the two distances to the float64 result, about twice the
# original's own; 4x leaves room for rewrites that change accumulation order (merged kernels).
ROUNDING_FACTOR = 4.0


def rounding_error(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
) -> list[float] | None:
    """Per float32 output, ``max |float32 run - float64 run|`` of ``module`` on ``inputs``: how
    far float32 rounding alone moves the model's own output (``outputs`` is its float32 run).

    A deep model's rounding grows with depth (a 260-layer detector: 1.5e-5 x max|out|), beyond
    a fixed ``rtol``; the exact contract takes the larger of the two. ``None`` when the model
    cannot run in float64 (a hard-coded float32 tensor, an op without a double kernel) or does
    not compute the same twice (random ops in forward).
    """
    if not any(t.dtype == torch.float32 for t in outputs):
        return None
    try:
        with torch.inference_mode(False):
            m64 = copy.deepcopy(module).double()
        inputs64 = [x.double() if x.is_floating_point() else x for x in inputs]
        out64 = run_module(m64, inputs64)
        again = run_module(m64, inputs64)
    except Exception:  # noqa: BLE001 - any failure only means no float64 reference
        return None
    # a model with random ops in forward differs from itself: what we'd measure is not rounding
    if len(out64) != len(outputs) or not all(map(torch.equal, out64, again)):
        return None
    errors = []
    for o32, o64 in zip(outputs, out64, strict=True):
        if o32.dtype != torch.float32 or o32.shape != o64.shape or not o32.numel():
            errors.append(0.0)
            continue
        err = float((o32.double() - o64.double()).abs().max())
        errors.append(err if math.isfinite(err) else 0.0)
    return errors


def default_rtol(dtype: torch.dtype) -> float:
    """Relative rounding budget of an exact rewrite for outputs of ``dtype``."""
    return {torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)


def compare(
    reference: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    numerics: Numerics,
    *,
    rounding: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
) -> Comparison:
    """Compare ``outputs`` with ``reference`` under ``numerics`` and return the worst output.

    Dtypes and shapes must match exactly. ``rounding``: per output, the model's own float32
    rounding error (:func:`rounding_error`); an exact contract allows ``ROUNDING_FACTOR`` times
    it where that is above ``rtol * max|ref|``. ``labels`` name the outputs in the result.
    """
    if len(reference) != len(outputs):
        return Comparison(
            False,
            "structure",
            float(len(outputs)),
            float(len(reference)),
            "outputs",
            {"expected_outputs": len(reference)},
        )
    worst: Comparison | None = None
    for i, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        name = labels[i] if labels is not None else f"output[{i}]"
        if ref.dtype != out.dtype:
            return Comparison(
                False,
                "dtype",
                math.inf,
                0.0,
                name,
                {"expected": _short_dtype(ref.dtype), "got": _short_dtype(out.dtype)},
            )
        if tuple(ref.shape) != tuple(out.shape):
            return Comparison(
                False,
                "shape",
                math.inf,
                0.0,
                name,
                {"expected": str(tuple(ref.shape)), "got": str(tuple(out.shape))},
            )
        if not ref.is_floating_point():
            equal = bool(torch.equal(ref, out))
            cmp = Comparison(equal, "mismatches", float((ref != out).sum()), 0.0, name, {})
        else:
            details = _metrics(ref, out)
            if numerics.kind == "exact":
                allowed = exact_tolerance(ref, numerics.rtol)
                if rounding is not None and i < len(rounding):
                    allowed = max(allowed, ROUNDING_FACTOR * rounding[i])
                measured = details["max_abs"]
                cmp = Comparison(measured <= allowed, "max_abs", measured, allowed, name, details)
            else:
                metric = numerics.metric
                measured = _top1(ref, out) if metric == "top1" else details[metric]
                details[metric] = measured
                if metric in _HIGHER_IS_BETTER:
                    ok = measured >= numerics.budget
                else:
                    ok = measured <= numerics.budget
                cmp = Comparison(ok, metric, measured, numerics.budget, name, details)
            if not math.isfinite(details["max_abs"]) and math.isfinite(details["scale"]):
                cmp.ok = False
        if worst is None or _worse(cmp, worst):
            worst = cmp
    assert worst is not None or not reference
    return worst or Comparison(True, "max_abs", 0.0, 0.0, "-", {})


def _worse(a: Comparison, b: Comparison) -> bool:
    if a.ok != b.ok:
        return not a.ok
    if a.metric != b.metric:
        return False
    if a.metric in _HIGHER_IS_BETTER:
        return a.measured < b.measured
    # relative to what is allowed, so outputs of different magnitudes compare fairly
    ra = a.measured / a.allowed if a.allowed > 0 else a.measured
    rb = b.measured / b.allowed if b.allowed > 0 else b.measured
    return ra > rb


# ------------------------------------------------------------------------------------------------
# canonical IR


def _short_dtype(dtype: torch.dtype | None) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", "")) if dtype else "?"


def _tensor_type(t: torch.Tensor) -> str:
    return f"{_short_dtype(t.dtype)}[{','.join(str(d) for d in t.shape)}]"


def _node_type(node: fx.Node) -> str:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return ""
    return f" : {_short_dtype(meta.dtype)}[{','.join(str(d) for d in meta.shape)}]"


def _callable_name(fn: Any) -> str:
    if isinstance(fn, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(fn)
    if fn in vars(operator).values():
        return f"operator.{fn.__name__}"
    module = getattr(fn, "__module__", "") or ""
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


def _module_text(module: torch.nn.Module) -> str:
    return f"{type(module).__name__}({module.extra_repr()})"


def _constant_text(value: Any, elide: bool) -> str:
    if isinstance(value, torch.nn.Module):  # a module handed to a function (tune-conv-bn)
        return f"module {_module_text(value)}"
    if isinstance(value, torch.Tensor):
        if elide:
            return f"const {_tensor_type(value)}"
        digest = hashlib.blake2b(
            value.detach().cpu().contiguous().numpy().tobytes(), digest_size=6
        ).hexdigest()
        return f"const {_tensor_type(value)} #{digest}"
    return f"const {type(value).__name__}"


def canonical_ir(gm: fx.GraphModule, *, elide_constants: bool = True, types: bool = False) -> str:
    """Print ``gm`` in canonical form: positional names, modules by kind, constants elided.

    ``types=True`` adds ``: f32[1,3,8,8]`` from shape metadata where the capture recorded it.
    """
    names: dict[fx.Node, str] = {}
    lines: list[str] = []

    def arg(a: Any) -> str:
        if isinstance(a, fx.Node):
            return names[a]
        if isinstance(a, tuple | list):
            inner = ", ".join(arg(x) for x in a)
            return f"({inner})" if isinstance(a, tuple) else f"[{inner}]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, torch.dtype):
            return _short_dtype(a)
        if isinstance(a, float) and math.isfinite(a):
            return repr(round(a, 8))
        return repr(a)

    def call(head: str, node: fx.Node) -> str:
        parts = [arg(a) for a in node.args]
        parts += [f"{k}={arg(v)}" for k, v in sorted(node.kwargs.items())]
        return f"{head}({', '.join(parts)})"

    counter = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = f"%in{len([n for n in names.values() if n.startswith('%in')])}"
            lines.append(f"{names[node]} = input{_node_type(node) if types else ''}")
            continue
        if node.op == "output":
            lines.append(f"return {arg(node.args[0])}")
            continue
        names[node] = f"%{counter}"
        counter += 1
        if node.op == "call_module":
            head = _module_text(gm.get_submodule(node.target))
        elif node.op == "call_function":
            head = _callable_name(node.target)
        elif node.op == "call_method":
            head = f".{node.target}"
        else:  # get_attr
            value = _fetch_attr(gm, node.target)
            text = _constant_text(value, elide_constants)
            lines.append(f"{names[node]} = {text}")
            continue
        lines.append(f"{names[node]} = {call(head, node)}{_node_type(node) if types else ''}")
    return "\n".join(lines) + "\n"


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def ir_diff(before: str, after: str, *, context: int = 2) -> str:
    """A unified diff of two canonical IR texts ('' when equal)."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(True), after.splitlines(True), "before", "after", n=context
        )
    )


# ------------------------------------------------------------------------------------------------
# fingerprints


def fingerprint(gm: torch.nn.Module, *, weights: bool = True) -> str:
    """A stable hash of a graph's structure (and, with ``weights``, of every parameter's bytes).

    Two captures of the same model give the same fingerprint; any rewrite changes it.
    """
    h = hashlib.blake2b(digest_size=16)
    if isinstance(gm, fx.GraphModule):
        h.update(canonical_ir(gm, elide_constants=True).encode())
    else:
        h.update(repr(gm).encode())
    if weights:
        for name, t in sorted(_named_tensors(gm)):
            h.update(name.encode())
            h.update(_tensor_type(t).encode())
            h.update(
                np.ascontiguousarray(
                    t.detach().cpu().float().numpy()
                    if t.dtype == torch.bfloat16
                    else t.detach().cpu().numpy()
                ).tobytes()
            )
    return h.hexdigest()


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = list(module.named_parameters(remove_duplicate=False))
    out += list(module.named_buffers(remove_duplicate=False))
    return out

"""Numeric contracts and the comparison that checks them.

A pass declares :class:`Numerics` (exact: float rounding only; lossy: a metric within a budget).
:func:`compare` measures outputs against a reference under a contract; exact contracts allow
``rtol x max|output|`` per output, widened by the model's own float32 rounding error where it is
measured (:func:`rounding_error`, :class:`Rounding`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from graphopt.core.printing import short_dtype

_METRICS = ("max_abs", "mean_abs", "rel_max", "cosine", "top1")


@dataclass(frozen=True)
class Numerics:
    """What a pass promises about the outputs of the graph it rewrites.

    ``exact``: float rounding only; the allowed error of each output is ``rtol * max|output|``
    (``rtol`` by dtype when not given: 1e-5 for float32, 1e-10 for float64).
    ``lossy``: a metric (``max_abs``, ``mean_abs``, ``rel_max``: at most ``budget``;
    ``cosine``, ``top1``: at least ``budget``).
    """

    kind: Literal["exact", "lossy"] = "exact"
    rtol: float | None = None
    metric: str = "max_abs"
    budget: float = 0.0

    @classmethod
    def exact(cls, rtol: float | None = None) -> Numerics:
        return cls("exact", rtol=rtol)

    @classmethod
    def lossy(cls, metric: str, budget: float) -> Numerics:
        if metric not in _METRICS:
            raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(_METRICS)}")
        return cls("lossy", metric=metric, budget=budget)

    def __str__(self) -> str:
        if self.kind == "exact":
            return "exact" if self.rtol is None else f"exact(rtol={self.rtol:g})"
        cmp = ">=" if self.metric in ("cosine", "top1") else "<="
        return f"lossy({self.metric} {cmp} {self.budget:g})"


def run_samples(
    gm: Any,
    samples: Sequence[tuple[Any, ...]],
    run: Callable[..., list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """The outputs of ``gm`` on each sample, concatenated in order (``run(gm, sample)``: how one
    sample runs; :func:`run_module` by default)."""
    run = run or run_module
    return [t for sample in samples for t in run(gm, sample)]


class Rounding:
    """The model's own float32 rounding error per output, measured only when needed.

    An exact check that fails under the fixed bound (``rtol x max|output|``) is judged again
    with the rounding of ``module`` (the graph as it computed ``reference``) measured against a
    float64 run: most models never pay for the float64 runs. ``value`` once measured (or given).
    ``measure(module, sample, outputs)`` measures one sample (:func:`rounding_error` by default).
    """

    def __init__(self, value: list[float] | None = None, measure: Callable[..., Any] | None = None):
        self.value = value
        self.measured = value is not None
        self.measure = measure or rounding_error
        self.module: Any = None
        self.samples: Sequence[tuple[Any, ...]] = ()
        self.reference: list[torch.Tensor] = []

    def compare(
        self,
        reference: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        numerics: Numerics,
        labels: Sequence[str] | None = None,
    ) -> Comparison:
        cmp = compare(reference, outputs, numerics, rounding=self.value, labels=labels)
        if cmp.ok or numerics.kind != "exact" or self.measured or self.module is None:
            return cmp
        self.measured = True
        self.value = self._measure()
        if self.value is None:
            return cmp
        return compare(reference, outputs, numerics, rounding=self.value, labels=labels)

    def _measure(self) -> list[float] | None:
        """Per output of :func:`run_samples`, the module's own rounding error, sample by sample."""
        per_sample = len(self.reference) // len(self.samples)
        errors: list[float] = []
        for k, sample in enumerate(self.samples):
            outputs = self.reference[k * per_sample : (k + 1) * per_sample]
            got = self.measure(self.module, sample, outputs)
            if got is None:
                return None
            errors += got
        return errors


def sample_labels(per_sample: int, samples: int) -> list[str] | None:
    """Output names for :func:`run_samples`' outputs; ``None`` (the default names) for one sample."""
    if samples <= 1:
        return None
    return [
        f"output[{i}]" if j == 0 else f"output[{i}] on random sample {j}"
        for j in range(samples)
        for i in range(per_sample)
    ]


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
            f"{self.metric} {_value(self.metric, self.measured)} (allowed {cmp} "
            f"{_value(self.metric, self.allowed)}) at {self.output}: {verdict}"
        )


_HIGHER_IS_BETTER = {"cosine", "top1"}


def _value(metric: str, value: float) -> str:
    """A measured or allowed value as a reader needs it: a cosine near 1 as ``1 - 1.2e-07``
    (``.3g`` printed 0.99999988 and 0.9999 alike as ``1``)."""
    if metric == "cosine" and 0.999 < value < 1.0:
        return f"1 - {1.0 - value:.2g}"
    return f"{value:.3g}"


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
                {"expected": short_dtype(ref.dtype), "got": short_dtype(out.dtype)},
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

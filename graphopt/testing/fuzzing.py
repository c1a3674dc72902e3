"""Fuzzing: random models through capture and a whole pipeline, judged on fresh inputs
(:func:`fuzz`, :func:`check_case`, :class:`FuzzReport`)."""

from __future__ import annotations

import random
import re
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from graphopt._util import first_line
from graphopt.backends.measure import Latency
from graphopt.core.numerics import Numerics, compare, flatten_outputs, rounding_error
from graphopt.core.pass_infra import Pass, PassContext
from graphopt.errors import GraphoptError
from graphopt.frontends.torch import capture
from graphopt.pipeline import PassManager
from graphopt.testing.fuzz_cases import FAMILIES, FuzzCase, fuzz_case

# the full exact pipeline: every exact pass, merge-convs timed by UnitCostBackend
FULL_EXACT_PIPELINE = (
    "remove-identity,fold-constants,fold-conv-bn,reparameterize,merge-convs{cache=false},"
    "equalize-layers,eliminate-dead-code"
)


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
    cache = None  # nothing to cache: the cost model is instant

    def settings(self) -> dict[str, Any]:
        return {}

    def measure(self, module: nn.Module, inputs: Any, **_: Any) -> Any:
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
    (the fuzz model itself failed: a bug in graphopt.testing.fuzz_cases).
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
            ref = flatten_outputs(model(*a))
        except Exception as exc:  # noqa: BLE001 - the fuzz model itself is broken
            return "generator-error", f"the original model raised: {_error_line(exc)}"
        try:
            out = flatten_outputs(gm(*b))
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
    exact = compare(ref, out, _exact())
    if not exact.ok:
        # the exact contract graphopt declares: rtol x max|out|, or 4x the model's own float32
        # rounding (against a float64 run) where that is larger; measured only when needed
        with _Mode(mode):
            rounding = rounding_error(model, tuple(x.clone() for x in args), ref)
        exact = compare(ref, out, _exact(), rounding=rounding)
    if not exact.ok:
        return "mismatch", f"outputs: {exact.describe()}"
    effects = compare(list(a), list(b), _exact())
    if not effects.ok:
        return "mismatch", (
            f"the inputs after the call differ (an in-place update of an input lost or added): "
            f"{effects.describe()}"
        )
    return "", ""


def _exact() -> Any:
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

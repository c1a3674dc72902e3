"""Passes, their numeric contracts, and the pass manager that runs and verifies them.

The manager runs a pipeline over an ``fx.GraphModule``. After every pass it lints the graph and,
when the context holds sample inputs, compares the outputs with those before the pass under the
pass's declared :class:`Numerics`. A pass that raises, produces an invalid graph or breaks its
contract is rolled back (the graph before it is restored) and reported; in strict mode it raises
:class:`PassError` / :class:`VerificationError` instead. Instruments observe each pass: timing,
IR printing and dumping with diffs, and a reproducer written on failure.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import fx

from graphopt import verify
from graphopt.errors import GraphoptError, PassError, PipelineError, VerificationError
from graphopt.pipeline import (
    Pipeline,
    check_options,
    format_value,
    option_fields,
    parse_pipeline,
)

if TYPE_CHECKING:
    from graphopt.target import Target

log = logging.getLogger(__name__)

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


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed, and statistics.

    ``decisions``: optionally one entry per thing the pass decided on (a latency-aware pass:
    per layer, what it measured, what it kept and why); ``str()`` of each is a report line and
    dataclass entries serialise with the report's JSON.
    """

    graph: fx.GraphModule
    modified: bool
    stats: Counter = field(default_factory=Counter)
    decisions: list[Any] = field(default_factory=list)


@dataclass
class PassContext:
    """Data a pass may use; options of a pass live in its ``Options`` instead.

    ``sample_inputs`` drive the numeric check after each pass; ``calibration_data`` is an
    iterable of input tuples for passes that calibrate; ``strict`` turns rollbacks into errors;
    ``finetune`` is the user's ``callable(graph_module)`` that lossy passes run on the graph
    after they changed it (dense-to-sparse fine-tuning: it trains the graph in place);
    ``metric`` is the user's ``metric(predict) -> float`` (higher is better, e.g. accuracy on
    a held-out split; ``predict(*arrays)`` runs the candidate network on numpy inputs) that
    lossy passes rank their choices by. ``extra_sample_inputs``: more input tuples every check
    runs on besides ``sample_inputs`` (``optimize`` adds a random one where an example input is
    constant). ``rounding``: per output of all samples in order, the model's own float32
    rounding error (:func:`graphopt.verify.rounding_error`), which widens exact contracts of
    deep models.
    """

    sample_inputs: tuple[Any, ...] | None = None
    calibration_data: Iterable[Any] | None = None
    target: Target | None = None
    backend: Any = None
    seed: int = 0
    instruments: list[Instrument] = field(default_factory=list)
    strict: bool = False
    verify: bool = True
    cache_dir: Path | None = None
    finetune: Callable[[fx.GraphModule], Any] | None = None
    metric: Callable[[Callable[..., Any]], float] | None = None
    extra_sample_inputs: list[tuple[Any, ...]] = field(default_factory=list)
    rounding: list[float] | None = None

    def check_samples(self) -> list[tuple[Any, ...]]:
        """Every input tuple the checks run on ([] without sample inputs)."""
        if self.sample_inputs is None:
            return []
        return [tuple(self.sample_inputs), *self.extra_sample_inputs]


def run_samples(gm: torch.nn.Module, samples: Sequence[tuple[Any, ...]]) -> list[torch.Tensor]:
    """The outputs of ``gm`` on each sample, concatenated in order."""
    return [t for sample in samples for t in verify.run_module(gm, sample)]


class Rounding:
    """The model's own float32 rounding error per output, measured only when needed.

    An exact check that fails under the fixed bound (``rtol x max|output|``) is judged again
    with the rounding of ``module`` (the graph as it computed ``reference``) measured against a
    float64 run: most models never pay for the float64 runs. ``value`` once measured (or given).
    """

    def __init__(self, value: list[float] | None = None) -> None:
        self.value = value
        self.measured = value is not None
        self.module: torch.nn.Module | None = None
        self.samples: Sequence[tuple[Any, ...]] = ()
        self.reference: list[torch.Tensor] = []

    def compare(
        self,
        reference: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        numerics: Numerics,
        labels: Sequence[str] | None = None,
    ) -> verify.Comparison:
        cmp = verify.compare(reference, outputs, numerics, rounding=self.value, labels=labels)
        if cmp.ok or numerics.kind != "exact" or self.measured or self.module is None:
            return cmp
        self.measured = True
        self.value = graph_rounding(self.module, self.samples, self.reference)
        if self.value is None:
            return cmp
        return verify.compare(reference, outputs, numerics, rounding=self.value, labels=labels)


def graph_rounding(
    gm: torch.nn.Module, samples: Sequence[tuple[Any, ...]], reference: list[torch.Tensor]
) -> list[float] | None:
    """Per output of :func:`run_samples`, ``gm``'s own float32 rounding error (against a
    float64 run, :func:`graphopt.verify.rounding_error`); ``None`` where it cannot be measured."""
    per_sample = len(reference) // len(samples)
    errors: list[float] = []
    for k, sample in enumerate(samples):
        outputs = reference[k * per_sample : (k + 1) * per_sample]
        got = verify.rounding_error(gm, sample, outputs)
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


class Pass:
    """Base class of a rewrite pass. Subclasses set ``name``, ``numerics`` and ``run``.

    Options are a frozen dataclass named ``Options`` on the subclass; ``Pass(**values)`` builds
    it, so ``FoldConvBN(include_linear=False)`` and ``fold-conv-bn{include_linear=false}`` are
    the same pass. A pass keeps no state between runs.
    """

    name: ClassVar[str] = ""
    numerics: ClassVar[Numerics] = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None, **values: Any) -> None:
        if options is not None and values:
            raise PipelineError("give a pass either an Options object or keyword options")
        if options is None:
            valid = option_fields(type(self))
            for key in values:
                if key not in valid:
                    raise PipelineError(
                        f"pass {self.name!r} has no option {key!r}. Valid "
                        f"options: {', '.join(valid) or 'none'}."
                    )
            options = self.Options(**values)
        # registered passes check in Options(); a pass used without registering is checked here
        check_options(type(self), options)
        self.options = options

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __str__(self) -> str:
        changed = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if value != f.default:
                changed.append(f"{f.name}={format_value(value)}")
        return self.name + ("{" + ",".join(changed) + "}" if changed else "")

    def __repr__(self) -> str:
        return f"<pass {self}>"


# ------------------------------------------------------------------------------------------------
# records


@dataclass
class PassRecord:
    """What happened to one pass of a pipeline run."""

    position: int
    name: str
    spec: str
    numerics: str
    status: Literal["ok", "rolled-back", "failed", "unverified"] = "ok"
    modified: bool = False
    time_s: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    decisions: list[Any] = field(default_factory=list)
    comparison: verify.Comparison | None = None
    message: str = ""
    reproducer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["comparison"] = dataclasses.asdict(self.comparison) if self.comparison else None
        return d


@dataclass
class PipelineResult:
    graph: fx.GraphModule
    records: list[PassRecord]
    end_to_end: verify.Comparison | None = None


# ------------------------------------------------------------------------------------------------
# instruments


class Instrument:
    """Observes a pipeline run. Override the hooks you need."""

    def before_pass(self, position: int, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after_pass(
        self, position: int, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord
    ) -> None:
        pass

    def on_failure(
        self,
        position: int,
        p: Pass,
        gm_before: fx.GraphModule,
        ctx: PassContext,
        record: PassRecord,
    ) -> str | None:
        """Called with the graph as it was before the failing pass; may return a path."""
        return None


class PrintTiming(Instrument):
    """One line per pass: position, name, time, outcome and statistics (progress for the CLI)."""

    def __init__(self, stream: IO[str] | None = None, total: int | None = None) -> None:
        self.stream = stream
        self.total = total

    def after_pass(self, position, p, gm, ctx, record) -> None:
        stream = self.stream or sys.stderr
        stats = " ".join(f"{k}={v}" for k, v in sorted(record.stats.items()))
        total = f"/{self.total}" if self.total else ""
        state = (
            record.status
            if record.status != "ok"
            else ("modified" if record.modified else "unchanged")
        )
        print(
            f"  [{position + 1}{total}] {record.spec:<28} {record.time_s * 1e3:8.1f} ms  "
            f"{state:<11} {stats}",
            file=stream,
            flush=True,
        )


class PrintIR(Instrument):
    """Print the canonical IR after each pass that changed the graph, with a diff."""

    def __init__(
        self, stream: IO[str] | None = None, *, diff: bool = True, only_modified: bool = True
    ) -> None:
        self.stream = stream
        self.diff = diff
        self.only_modified = only_modified
        self._before = ""

    def before_pass(self, position, p, gm, ctx) -> None:
        self._before = verify.canonical_ir(gm)

    def after_pass(self, position, p, gm, ctx, record) -> None:
        if self.only_modified and not record.modified:
            return
        stream = self.stream or sys.stderr
        after = verify.canonical_ir(gm)
        print(f"// ----- IR after {record.spec} ({record.status}) -----", file=stream)
        print(verify.ir_diff(self._before, after) if self.diff else after, file=stream)


class DumpIR(Instrument):
    """Write ``NN-<pass>.ir`` (canonical IR) and ``NN-<pass>.diff`` after every pass."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._before = ""

    def before_pass(self, position, p, gm, ctx) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._before = verify.canonical_ir(gm, types=True)
        if position == 0:
            (self.directory / "00-input.ir").write_text(self._before)

    def after_pass(self, position, p, gm, ctx, record) -> None:
        after = verify.canonical_ir(gm, types=True)
        stem = self.directory / f"{position + 1:02d}-{p.name}"
        stem.with_suffix(".ir").write_text(after)
        stem.with_suffix(".diff").write_text(verify.ir_diff(self._before, after))


class Reproducer(Instrument):
    """On failure, save the graph before the failing pass, the inputs and a script that reruns it.

    ``directory=None`` makes a fresh temporary directory per failure.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None

    def on_failure(self, position, p, gm_before, ctx, record) -> str | None:
        if self.directory is None:
            out = Path(tempfile.mkdtemp(prefix="graphopt-repro-"))
        else:
            out = self.directory / f"{position + 1:02d}-{p.name}"
            out.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(gm_before, out / "graph.pt")
            torch.save(ctx.sample_inputs, out / "inputs.pt")
        except Exception as exc:  # a graph holding unpicklable objects still gets its IR saved
            log.warning("reproducer: could not pickle the graph (%s); saving its IR only", exc)
        (out / "graph.ir").write_text(verify.canonical_ir(gm_before, types=True))
        (out / "repro.py").write_text(
            textwrap.dedent(f"""\
            # Reproducer written by graphopt: pass {record.spec!r} (position {position + 1})
            # {record.status}: {record.message.splitlines()[0] if record.message else ""}
            from pathlib import Path
            import torch
            from graphopt.pass_manager import PassContext, PassManager

            here = Path(__file__).parent
            gm = torch.load(here / "graph.pt", weights_only=False)
            inputs = torch.load(here / "inputs.pt", weights_only=False)
            PassManager({record.spec!r}, strict=True).run(gm, PassContext(sample_inputs=inputs))
            print("pass ran cleanly")
            """)
        )
        return str(out)


# ------------------------------------------------------------------------------------------------
# the manager


class PassManager:
    """Run a pipeline of passes with verification after each one.

    >>> pm = PassManager("fold-conv-bn,eliminate-dead-code")
    >>> result = pm.run(gm, PassContext(sample_inputs=(x,)))
    >>> result.records[0].stats
    {'folded': 20}
    """

    def __init__(
        self,
        pipeline: str | Pipeline | Sequence[Pass],
        *,
        strict: bool = False,
        verify: bool = True,
        instruments: Sequence[Instrument] = (),
    ) -> None:
        if isinstance(pipeline, str | Pipeline):
            self.passes = parse_pipeline(pipeline).instantiate()
        else:
            self.passes = list(pipeline)
        self.strict = strict
        self.verify = verify
        self.instruments = list(instruments)

    @property
    def pipeline(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PipelineResult:
        """Rewrite ``gm`` in place with every pass; returns the final graph and the records."""
        ctx = ctx or PassContext()
        strict = self.strict or ctx.strict
        instruments = self.instruments + list(ctx.instruments)
        samples = ctx.check_samples() if (self.verify and ctx.verify) else []
        reference = run_samples(gm, samples) if samples else None
        original = reference
        labels = sample_labels(len(reference) // len(samples), len(samples)) if samples else None
        rounding = Rounding(ctx.rounding)  # optimize() may have measured it on the user's model
        rounding.samples = samples
        records: list[PassRecord] = []
        for position, p in enumerate(self.passes):
            record = PassRecord(position, p.name, str(p), str(p.numerics))
            for inst in instruments:
                inst.before_pass(position, p, gm, ctx)
            with torch.inference_mode(False):  # the backup stays trainable, like the graph
                backup = copy.deepcopy(gm)
            start = time.perf_counter()
            failure: Exception | None = None
            try:
                result = p.run(gm, ctx)
                new_gm = result.graph
                record.modified = bool(result.modified)
                record.stats = dict(result.stats)
                record.decisions = list(result.decisions)
                new_gm.graph.lint()
                new_gm.recompile()
            except Exception as exc:  # noqa: BLE001 - a pass failing must not lose the model
                failure = exc
            record.time_s = time.perf_counter() - start
            # checked whether or not the pass says it changed anything: a pass that reports
            # modified=False is held to the same contract, so a dishonest one cannot slip by
            if failure is None and reference is not None:
                try:
                    outputs = run_samples(new_gm, samples)
                except Exception as exc:  # noqa: BLE001
                    failure = exc
                else:
                    rounding.module, rounding.reference = backup, reference
                    record.comparison = rounding.compare(reference, outputs, p.numerics, labels)
            elif failure is None and reference is None:
                record.status = "unverified"
            if failure is not None:
                record.status = "failed"
                record.message = f"{type(failure).__name__}: {failure}"
            elif record.comparison is not None and not record.comparison.ok:
                record.status = "rolled-back"
                record.message = (
                    "broke its numeric contract "
                    + str(p.numerics)
                    + ": "
                    + record.comparison.describe()
                )
                if not record.modified:
                    record.message += " (while reporting modified=False)"
            if record.status in ("failed", "rolled-back"):
                for inst in instruments:
                    path = inst.on_failure(position, p, backup, ctx, record)
                    record.reproducer = record.reproducer or path
                gm = backup
                log.warning("pass %s %s: %s", record.spec, record.status, record.message)
                records.append(record)
                for inst in instruments:
                    inst.after_pass(position, p, gm, ctx, record)
                if strict:
                    raise self._error(record, failure)
                continue
            gm = new_gm
            if record.comparison is not None:
                reference = outputs
            records.append(record)
            for inst in instruments:
                inst.after_pass(position, p, gm, ctx, record)
        end_to_end = None
        if original is not None:
            # ``reference`` holds the outputs of the graph as it now is (each kept pass's, or
            # the graph's before a pass that was rolled back): no need to run it again
            end_to_end = rounding.compare(
                original, reference, _combined(self.passes, records), labels
            )
        return PipelineResult(gm, records, end_to_end)

    @staticmethod
    def _error(record: PassRecord, failure: Exception | None) -> GraphoptError:
        where = f"pass {record.spec!r} (position {record.position + 1})"
        repro = f" Reproducer: {record.reproducer}/repro.py." if record.reproducer else ""
        if failure is not None:
            err = PassError(
                f"{where} failed: {record.message}.{repro}",
                pass_name=record.name,
                position=record.position,
                reproducer=record.reproducer,
            )
            err.__cause__ = failure
            return err
        cmp = record.comparison
        assert cmp is not None
        return VerificationError(
            f"{where} broke its numeric contract {record.numerics}: {cmp.output} has "
            f"{cmp.metric} {cmp.measured:.3g}, allowed {cmp.allowed:.3g}. The pass was rolled "
            f"back; run without strict mode to skip it, or report the bug with the reproducer."
            f"{repro}",
            pass_name=record.name,
            output=cmp.output,
            measured=cmp.measured,
            allowed=cmp.allowed,
            reproducer=record.reproducer,
        )


def _combined(passes: Sequence[Pass], records: Sequence[PassRecord]) -> Numerics:
    """The end-to-end contract: exact if every pass that changed the graph is exact."""
    applied = [p for p, r in zip(passes, records, strict=False) if r.modified and r.status == "ok"]
    lossy = [p.numerics for p in applied if p.numerics.kind == "lossy"]
    if not lossy:
        return Numerics.exact()
    # several lossy passes: report against the loosest metric's budget of the first one
    return lossy[0]

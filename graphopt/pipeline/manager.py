"""The pass manager: runs a pipeline of passes with verification after each one.

The manager runs a pipeline over an ``fx.GraphModule``. After every pass it lints the graph and,
when the context holds sample inputs, compares the outputs with those before the pass under the
pass's declared :class:`Numerics`. A pass that raises, produces an invalid graph or breaks its
contract is rolled back (the graph before it is restored) and reported; in strict mode it raises
:class:`PassError` / :class:`VerificationError` instead. Instruments observe each pass: timing,
IR printing and dumping with diffs, and a reproducer written on failure.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from graphopt.core.ir import FX, IR
from graphopt.core.names import decision_dict
from graphopt.core.numerics import Comparison, Numerics, Rounding, run_samples, sample_labels
from graphopt.core.pass_infra import Pass, PassContext
from graphopt.errors import GraphoptError, PassError, PipelineError, VerificationError
from graphopt.pipeline.instruments import Instrument
from graphopt.pipeline.text import Pipeline, parse_pipeline

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What happened to one pass of a pipeline run."""

    position: int
    name: str
    spec: str
    numerics: str
    status: Literal["ok", "rolled-back", "failed", "unverified", "skipped"] = "ok"
    modified: bool = False
    time_s: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    decisions: list[Any] = field(default_factory=list)
    comparison: Comparison | None = None
    message: str = ""
    reproducer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["comparison"] = dataclasses.asdict(self.comparison) if self.comparison else None
        # fields, with ``layer`` (the module path) beside a node name; others as their text
        d["decisions"] = [decision_dict(x) for x in self.decisions]
        return d


@dataclass
class PipelineResult:
    graph: Any
    records: list[PassRecord]
    end_to_end: Comparison | None = None


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
        ir: IR = FX,
    ) -> None:
        if isinstance(pipeline, str | Pipeline):
            self.passes = parse_pipeline(pipeline).instantiate()
        else:
            self.passes = list(pipeline)
        self.strict = strict
        self.verify = verify
        self.instruments = list(instruments)
        self.ir = ir
        if wrong := [p for p in self.passes if p.ir != ir.name]:
            raise PipelineError(
                f"pass {wrong[0]} rewrites the {wrong[0].ir} stage's models, not {ir.name} ones; "
                "a pass manager runs the passes of one stage (optimize() runs each stage's "
                "passes of a pipeline string where they belong)."
            )

    @property
    def pipeline(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def run(self, gm: Any, ctx: PassContext | None = None) -> PipelineResult:
        """Rewrite ``gm`` in place with every pass; returns the final graph and the records."""
        ctx = ctx or PassContext()
        run = _Run(self, ctx)
        run.reference = run.outputs(gm) if run.samples else None
        original = run.reference
        for position, p in enumerate(self.passes):
            gm = run.step(position, p, gm)
        end_to_end = None
        if original is not None:
            # ``reference`` holds the outputs of the graph as it now is (each kept pass's, or
            # the graph's before a pass that was rolled back): no need to run it again
            end_to_end = run.rounding.compare(
                original, run.reference, _combined(self.passes, run.records), run.labels
            )
        return PipelineResult(gm, run.records, end_to_end)

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


class _Run:
    """One run of a :class:`PassManager`: the sample outputs so far and the records."""

    def __init__(self, manager: PassManager, ctx: PassContext) -> None:
        self.ir = manager.ir
        self.ctx = dataclasses.replace(ctx, ir=manager.ir)
        self.strict = manager.strict or ctx.strict
        self.instruments = manager.instruments + list(ctx.instruments)
        self.samples = ctx.check_samples() if (manager.verify and ctx.verify) else []
        self.reference: list[torch.Tensor] | None = None
        self.labels: list[str] | None = None
        # optimize() may have measured the model's rounding already
        self.rounding = Rounding(ctx.rounding, measure=self.ir.rounding)
        self.rounding.samples = self.samples
        self.records: list[PassRecord] = []

    def outputs(self, gm: Any) -> list[torch.Tensor]:
        outputs = run_samples(gm, self.samples, self.ir.run)
        if self.labels is None:
            self.labels = sample_labels(len(outputs) // len(self.samples), len(self.samples))
        return outputs

    def step(self, position: int, p: Pass, gm: Any) -> Any:
        """Run pass ``p``; returns the graph to go on with (``gm``'s backup after a rollback)."""
        record = PassRecord(position, p.name, str(p), str(p.numerics))
        if not all(inst.should_run(position, p, gm, self.ctx) for inst in self.instruments):
            record.status, record.message = "skipped", "skipped by an instrument"
            return self._finish(position, p, gm, record)
        for inst in self.instruments:
            inst.before_pass(position, p, gm, self.ctx)
        backup = self.ir.copy(gm)
        new_gm, outputs, failure = self._apply(p, gm, backup, record)
        if record.status in ("failed", "rolled-back"):
            for inst in self.instruments:
                path = inst.on_failure(position, p, backup, self.ctx, record)
                record.reproducer = record.reproducer or path
            log.warning("pass %s %s: %s", record.spec, record.status, record.message)
            self._finish(position, p, backup, record)
            if self.strict:
                raise PassManager._error(record, failure)
            return backup
        if record.comparison is not None:
            self.reference = outputs
        return self._finish(position, p, new_gm, record)

    def _apply(self, p: Pass, gm: Any, backup: Any, record: PassRecord) -> tuple:
        """Run ``p`` on ``gm`` and check it; fills ``record``. Returns the new graph, its
        sample outputs (when checked) and the exception that made the pass fail, if any."""
        start = time.perf_counter()
        new_gm, outputs, failure = gm, None, None
        try:
            result = p.run(gm, self.ctx)
            new_gm = result.graph
            record.modified = bool(result.modified)
            record.stats = dict(result.stats)
            record.decisions = list(result.decisions)
            self.ir.validate(new_gm)
        except Exception as exc:  # noqa: BLE001 - a pass failing must not lose the model
            failure = exc
        record.time_s = time.perf_counter() - start
        # checked whether or not the pass says it changed anything: a pass that reports
        # modified=False is held to the same contract, so a dishonest one cannot slip by
        if failure is None and self.reference is not None:
            try:
                outputs = self.outputs(new_gm)
            except Exception as exc:  # noqa: BLE001
                failure = exc
            else:
                self.rounding.module, self.rounding.reference = backup, self.reference
                record.comparison = self.rounding.compare(
                    self.reference, outputs, p.numerics, self.labels
                )
        elif failure is None:
            record.status = "unverified"
        if failure is not None:
            record.status = "failed"
            record.message = f"{type(failure).__name__}: {failure}"
        elif record.comparison is not None and not record.comparison.ok:
            record.status = "rolled-back"
            record.message = (
                f"broke its numeric contract {p.numerics}: {record.comparison.describe()}"
            )
            if not record.modified:
                record.message += " (while reporting modified=False)"
        return new_gm, outputs, failure

    def _finish(self, position: int, p: Pass, gm: Any, record: PassRecord) -> Any:
        self.records.append(record)
        for inst in self.instruments:
            inst.after_pass(position, p, gm, self.ctx, record)
        return gm


def _combined(passes: Sequence[Pass], records: Sequence[PassRecord]) -> Numerics:
    """The end-to-end contract: exact if every pass that changed the graph is exact."""
    applied = [p for p, r in zip(passes, records, strict=False) if r.modified and r.status == "ok"]
    lossy = [p.numerics for p in applied if p.numerics.kind == "lossy"]
    if not lossy:
        return Numerics.exact()
    # several lossy passes: report against the loosest metric's budget of the first one
    return lossy[0]

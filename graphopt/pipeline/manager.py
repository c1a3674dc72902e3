"""The pass manager: runs a pipeline of passes with verification after each one.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from graphopt.core.numerics import Comparison, Numerics, Rounding, run_samples, sample_labels
from graphopt.core.pass_infra import Pass, PassContext
from graphopt.errors import GraphoptError, PassError, VerificationError
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
    status: Literal["ok", "rolled-back", "failed", "unverified"] = "ok"
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
        return d


@dataclass
class PipelineResult:
    graph: fx.GraphModule
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

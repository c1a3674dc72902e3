"""Instruments observe a pipeline run: timing, IR printing and dumping with diffs, and a
reproducer written when a pass fails.
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import fx

from graphopt.core.ir import FX, IR
from graphopt.core.pass_infra import Pass, PassContext
from graphopt.core.printing import ir_diff
from graphopt.core.progress import Progress

if TYPE_CHECKING:
    from graphopt.pipeline.manager import PassRecord

log = logging.getLogger(__name__)


def _ir(ctx: PassContext) -> IR:
    return ctx.ir or FX  # an instrument called outside a manager observes an FX graph


class Instrument:
    """Observes a pipeline run. Override the hooks you need.

    ``should_run`` can keep a pass from running (it is then recorded as ``skipped``): bisection
    is an instrument. ``ctx.ir`` is the IR the manager runs (:mod:`graphopt.core.ir`).
    """

    def should_run(self, position: int, p: Pass, gm: Any, ctx: PassContext) -> bool:
        return True

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
    """One line per pass: position, name, time, outcome and statistics (progress for the CLI).

    With a ``progress`` (:class:`~graphopt.core.progress.Progress`; the CLI's) the pass about to
    run is its current phase, kept alive while it runs, and the lines go through it; else they
    are printed to ``stream`` (default stderr). ``total``: the pipeline's length for ``[3/7]``.
    A pass of a later stage (int8's ONNX passes, run by their own manager after the FX ones)
    is numbered after the FX passes this instrument saw, as the report's table numbers it.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        total: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.stream = stream
        self.total = total
        self.progress = progress if progress is not None and progress.enabled else None
        self.fx_passes = 0  # FX passes seen: a later stage's passes are numbered after them

    def _label(self, position: int, p: Pass) -> str:
        if p.ir == FX.name:
            self.fx_passes = max(self.fx_passes, position + 1)
            return f"[{position + 1}{f'/{self.total}' if self.total else ''}]"
        return f"[{self.fx_passes + position + 1}]"

    def before_pass(self, position, p, gm, ctx) -> None:
        if self.progress is not None:
            self.progress.status(f"{self._label(position, p)} {p} running")

    def after_pass(self, position, p, gm, ctx, record) -> None:
        stats = " ".join(f"{k}={v}" for k, v in sorted(record.stats.items()))
        label = self._label(position, p)
        line = (
            f"  {label} {record.spec:<28} {record.time_s * 1e3:8.1f} ms  "
            f"{outcome(record):<11} {stats}"
        )
        if self.progress is not None:
            self.progress.line(line)
            self.progress.status(f"after {label} {p}")
        else:
            print(line, file=self.stream or sys.stderr, flush=True)


def outcome(record: PassRecord) -> str:
    """The word for what a pass did: its status when not ``ok``, else whether it changed the
    graph (the report's ``changed`` column)."""
    if record.status != "ok":
        return record.status
    return "modified" if record.modified else "unchanged"


class Snapshots(Instrument):
    """A copy of the graph after each pass that changed its structure (``graphs``:
    ``[(spec, gm)]``), so the latency after each pass can be measured (``optimize(measure=True)``
    uses it). A pass that changed weights only (equalize-layers: the IR text, which holds no
    weight, reads the same) runs as fast as the graph before it: ``weights_only`` names it, and
    no copy is kept to be timed again."""

    def __init__(self) -> None:
        self.graphs: list[tuple[str, fx.GraphModule]] = []
        self.weights_only: list[str] = []
        self._before = ""

    def before_pass(self, position, p, gm, ctx) -> None:
        self._before = FX.text(gm) if isinstance(gm, fx.GraphModule) else ""

    def after_pass(self, position, p, gm, ctx, record) -> None:
        fx_graph = isinstance(gm, fx.GraphModule)  # not the int8 stage's ONNX models
        if not (fx_graph and record.modified and record.status in ("ok", "unverified")):
            return
        if FX.text(gm) == self._before:
            self.weights_only.append(record.spec)
        else:
            self.graphs.append((record.spec, copy.deepcopy(gm)))


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
        self._before = _ir(ctx).text(gm)

    def after_pass(self, position, p, gm, ctx, record) -> None:
        if self.only_modified and not record.modified:
            return
        stream = self.stream or sys.stderr
        after = _ir(ctx).text(gm)
        print(f"// ----- IR after {record.spec} ({record.status}) -----", file=stream)
        print(ir_diff(self._before, after) if self.diff else after, file=stream)


class DumpIR(Instrument):
    """Write ``NN-<pass>.ir`` (canonical IR) and ``NN-<pass>.diff`` after every pass."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._before = ""

    def before_pass(self, position, p, gm, ctx) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._before = _ir(ctx).text(gm, types=True)
        if position == 0:
            (self.directory / "00-input.ir").write_text(self._before)

    def after_pass(self, position, p, gm, ctx, record) -> None:
        after = _ir(ctx).text(gm, types=True)
        stem = self.directory / f"{position + 1:02d}-{p.name}"
        stem.with_suffix(".ir").write_text(after)
        stem.with_suffix(".diff").write_text(ir_diff(self._before, after))


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
        ir = _ir(ctx)
        load = f"model = ...  # the graph could not be saved; see {out / 'graph.ir'}"
        torch.save(ctx.sample_inputs, out / "inputs.pt")
        calibration = ctx.calibration_data
        if isinstance(calibration, list | tuple):  # re-iterable: the pass saw these batches
            torch.save(list(calibration), out / "calibration.pt")
        try:
            load = ir.save(gm_before, out)
        except Exception as exc:  # a graph holding unpicklable objects still gets its IR saved
            log.warning("reproducer: could not save the graph (%s); saving its IR only", exc)
        (out / "graph.ir").write_text(ir.text(gm_before, types=True))
        (out / "repro.py").write_text(_script(position, p, record, ir, load))
        return str(out)


def _script(position: int, p: Pass, record: PassRecord, ir: IR, load: str) -> str:
    """The reproducer's repro.py: reruns the failing pass, strict, on the saved graph."""
    module, attribute = ir.locator.split(":")
    owner = type(p).__module__  # a user's pass registers when its module is imported
    plugin = "" if owner.startswith("graphopt.") or owner == "__main__" else _import_line(owner)
    return (
        textwrap.dedent(f"""\
        # Reproducer written by graphopt: pass {record.spec!r} (position {position + 1})
        # {record.status}: {record.message.splitlines()[0] if record.message else ""}
        from pathlib import Path
        import torch
        from graphopt.core import PassContext
        from graphopt.pipeline import PassManager
        from {module} import {attribute} as IR
        """)
        + plugin
        + textwrap.dedent(f"""\

        here = Path(__file__).parent
        {load}
        inputs = torch.load(here / "inputs.pt", weights_only=False)
        calibration = None
        if (here / "calibration.pt").exists():
            calibration = torch.load(here / "calibration.pt", weights_only=False)
        pm = PassManager({record.spec!r}, strict=True, ir=IR)
        pm.run(model, PassContext(sample_inputs=inputs, calibration_data=calibration))
        print("pass ran cleanly")
        """)
    )


def _import_line(owner: str) -> str:
    """``import owner``, after putting the directory it was imported from at the end of
    ``sys.path`` (a module loaded from a file, e.g. ``graphopt --plugin mypasses.py``, is found
    there; an installed one still comes first)."""
    file = getattr(sys.modules.get(owner), "__file__", None)
    if not file:
        return f"import {owner}\n"
    path = Path(file).resolve()
    if path.name == "__init__.py":
        path = path.parent
    root = path.parents[owner.count(".")]
    return f"import sys\nsys.path.append({str(root)!r})\nimport {owner}\n"


class Bisect(Instrument):
    """Let the first ``limit`` passes run; every later one is recorded ``skipped``.

    A search over ``limit`` reruns a pipeline with this instrument to find the pass after which
    something first goes wrong (optimize's bisection of an artifact that disagrees with the
    model). ``among``: the positions that count, in order (e.g. the passes that changed the
    graph in the full run); the first ``limit`` of them run and every other pass is skipped.
    """

    def __init__(self, limit: int, among: Sequence[int] | None = None) -> None:
        self.limit = limit
        self.among = None if among is None else list(among)

    def should_run(self, position, p, gm, ctx) -> bool:
        if self.among is None:
            return position < self.limit
        return position in self.among[: self.limit]

"""The pass contract: a :class:`Pass`, the :class:`PassContext` it may read, the
:class:`PassResult` it returns.

A pass is a small class with a kebab-case ``name``, declared :class:`~graphopt.core.numerics.Numerics`
and a frozen ``Options`` dataclass; it keeps no state between runs. The pipeline manager
(:mod:`graphopt.pipeline.manager`) runs it, checks the contract and rolls it back when broken.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import fx

from graphopt.core.numerics import Numerics
from graphopt.core.options import check_options, format_value, option_fields
from graphopt.errors import PipelineError

if TYPE_CHECKING:
    from graphopt.target import Target


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
    rounding error (:func:`graphopt.core.numerics.rounding_error`), which widens exact contracts of
    deep models.
    """

    sample_inputs: tuple[Any, ...] | None = None
    calibration_data: Iterable[Any] | None = None
    target: Target | None = None
    backend: Any = None
    seed: int = 0
    instruments: list[Any] = field(default_factory=list)
    strict: bool = False
    verify: bool = True
    cache_dir: Path | None = None
    finetune: Callable[[fx.GraphModule], Any] | None = None
    metric: Callable[[Callable[..., Any]], float] | None = None
    extra_sample_inputs: list[tuple[Any, ...]] = field(default_factory=list)
    rounding: list[float] | None = None
    ir: Any = None  # the IR the pass manager runs (graphopt.core.ir); set by the manager

    def calibration_batches(self) -> Iterable[tuple[Any, ...]] | None:
        """The calibration batches as input tuples (a lone tensor becomes a 1-tuple), read
        lazily; else the sample inputs as one batch; else None."""
        if self.calibration_data is not None:
            return (b if isinstance(b, tuple | list) else (b,) for b in self.calibration_data)
        if self.sample_inputs is not None:
            return [tuple(self.sample_inputs)]
        return None

    def check_samples(self) -> list[tuple[Any, ...]]:
        """Every input tuple the checks run on ([] without sample inputs)."""
        if self.sample_inputs is None:
            return []
        return [tuple(self.sample_inputs), *self.extra_sample_inputs]


class Pass:
    """Base class of a rewrite pass. Subclasses set ``name``, ``numerics`` and ``run``.

    Options are a frozen dataclass named ``Options`` on the subclass; ``Pass(**values)`` builds
    it, so ``FoldConvBN(include_linear=False)`` and ``fold-conv-bn{include_linear=false}`` are
    the same pass. A pass keeps no state between runs.
    """

    name: ClassVar[str] = ""
    numerics: ClassVar[Numerics] = Numerics.exact()
    ir: ClassVar[str] = "fx"  # the IR the pass rewrites: "fx", or "onnx" for int8's ONNX stage

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

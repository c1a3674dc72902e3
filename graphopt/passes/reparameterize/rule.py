"""A rewrite rule as onnxscript's rewriter writes one: pattern, check, rewrite."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import fx

from graphopt.fx.memo import RunMemo


@dataclass(frozen=True)
class Rule:
    """``pattern`` finds candidates, each on the graph as the rewrites before it left it (a lazy
    iterator); ``check`` gives the reason a candidate is refused, None to go ahead; ``rewrite``
    changes the graph and returns what it did, as statistics. A refusal counts as
    ``skipped:<reason>``."""

    name: str
    pattern: Callable[[fx.GraphModule, RunMemo], Iterable[Any]]
    check: Callable[[fx.GraphModule, RunMemo, Any], str | None]
    rewrite: Callable[[fx.GraphModule, RunMemo, Any], Counter]

    def apply(self, gm: fx.GraphModule, memo: RunMemo, stats: Counter) -> None:
        """One pass of the rule over ``gm``, its counts added to ``stats``."""
        for match in self.pattern(gm, memo):
            if (reason := self.check(gm, memo, match)) is not None:
                stats[f"skipped:{reason}"] += 1
                continue
            stats.update(self.rewrite(gm, memo, match))

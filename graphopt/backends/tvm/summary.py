"""What compiling with TVM did: each task's schedule, and what tuning did (or why it did not).

Imports no TVM, so the report reads these without the ``graphopt[tvm]`` extra.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# how a fused TIR function got its schedule, in the order the report lists them: ``tuned`` (a
# database record was applied), ``default`` (no record: rules applied without measuring),
# ``naive`` (nothing could schedule it: plain loops)
TVM_STATUSES = ("tuned", "default", "naive")


@dataclass
class TaskInfo:
    """One fused TIR function of the compiled module and how it was scheduled."""

    name: str
    status: str  # one of TVM_STATUSES
    heavy: bool = False
    best_ms: float | None = None  # the database's best measured time, for tuned tasks

    def describe(self) -> str:
        best = f" ({self.best_ms:.3f} ms)" if self.best_ms is not None else ""
        return f"{self.name}: {self.status}{best}"


@dataclass
class TuningSummary:
    """What tuning did (or why it did not run)."""

    database: str
    trials_requested: int = 0
    minutes_requested: float | None = None
    trials_run: int = 0
    seconds: float = 0.0
    reused: bool = False  # the database already held this model's budget: no tuning ran
    failed_trials: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # trials, seconds, est_ms
    warnings: list[str] = field(default_factory=list)
    tasks_tuned: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.reused:
            budget = (
                f"{self.minutes_requested:g} min"
                if self.minutes_requested
                else f"{self.trials_requested} trials"
            )
            return (
                f"reused the tuning database {self.database} (a budget of {budget} was already "
                "spent there on this model): no tuning ran"
            )
        if not self.trials_run:
            return f"not tuned (database {self.database})"
        return (
            f"tuned {self.trials_run} trials ({self.failed_trials} failed) in "
            f"{self.seconds:.0f} s over {self.tasks_tuned} tasks; database {self.database}"
        )

"""Pipelines of passes: the text form, the manager that runs and verifies them, instruments.

``text``: ``parse_pipeline("fold-conv-bn,merge-convs{budget=0.7}")``. ``manager``:
:class:`PassManager` runs passes, checks each one's numeric contract and rolls back a pass that
breaks it. ``instruments``: timing, IR printing and dumps, reproducers, bisection.
"""

from graphopt.pipeline.instruments import (
    Bisect,
    DumpIR,
    Instrument,
    PrintIR,
    PrintTiming,
    Reproducer,
    Snapshots,
)
from graphopt.pipeline.manager import PassManager, PassRecord, PipelineResult
from graphopt.pipeline.text import PassSpec, Pipeline, parse_pipeline

__all__ = [
    "Bisect",
    "DumpIR",
    "Instrument",
    "PassManager",
    "PassRecord",
    "PassSpec",
    "Pipeline",
    "PipelineResult",
    "PrintIR",
    "PrintTiming",
    "Reproducer",
    "Snapshots",
    "parse_pipeline",
]

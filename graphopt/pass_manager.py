"""Transitional: the names moved to graphopt.core and graphopt.pipeline (removed before #16 closes)."""
# ruff: noqa: F401
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.pipeline import (
    DumpIR,
    Instrument,
    PassManager,
    PassRecord,
    PrintIR,
    PrintTiming,
    Reproducer,
)

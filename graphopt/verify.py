"""Transitional: the names moved to graphopt.core.numerics and graphopt.core.printing (removed before #16 closes)."""
# ruff: noqa: F401
from graphopt.core.numerics import (
    ROUNDING_FACTOR,
    Comparison,
    compare,
    default_rtol,
    exact_tolerance,
    flatten_outputs,
    rounding_error,
    run_module,
)
from graphopt.core.printing import canonical_ir, fingerprint, ir_diff

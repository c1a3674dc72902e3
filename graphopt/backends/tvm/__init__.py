"""TVM backend: FX graph -> Relax -> MetaSchedule-tuned library, run with the Relax VM.

``backend``: :class:`TvmBackend` (compile, load, tune, measure); ``lower``: targets, import into
Relax, fusion and the final lowering; ``tuner``: MetaSchedule under a budget; ``database``: the
tuning records on disk; ``schedule``: records applied and defaults for the rest; ``artifact``:
:class:`TvmArtifact`; ``summary``: :data:`TVM_STATUSES`, :class:`TaskInfo`,
:class:`TuningSummary`; ``rpc``: remote devices through an RPC tracker; ``worker``: start-up of
MetaSchedule's builder processes.

Apache TVM is an extra (``pip install 'graphopt[tvm]'``): the names that need it are imported on
first use (PEP 562), so ``import graphopt.backends.tvm`` (the report reads
:data:`TVM_STATUSES`, builder workers start through :mod:`~graphopt.backends.tvm.worker`) does
not import TVM; without it, those names raise a ``BackendError`` that says what to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graphopt.backends.tvm.summary import TVM_STATUSES, TaskInfo, TuningSummary
from graphopt.errors import BackendError

# public name -> the module of this package that defines it (each imports TVM)
_LAZY: dict[str, str] = {
    "TvmBackend": "backend",
    "TvmArtifact": "artifact",
    "DB_FORMAT": "database",
    "TuningDatabase": "database",
    "cross_compiler": "lower",
    "cross_compiler_name": "lower",
    "fuse": "lower",
    "fuse_passes": "lower",
    "is_cross": "lower",
    "op_counts": "lower",
    "qdq_import_summary": "lower",
    "relax_from_proto": "lower",
    "target_json": "lower",
    "to_relax": "lower",
    "tvm_target": "lower",
    "HEAVY_OPS": "schedule",
    "default_schedule": "schedule",
    "is_heavy": "schedule",
    "prim_funcs": "schedule",
    "BUILD_TIMEOUT_S": "tuner",
    "SECONDS_PER_TRIAL": "tuner",
    "Tuner": "tuner",
    "TuningDeadline": "tuner",
    "model_key": "tuner",
    "persistent_builder": "tuner",
}

__all__ = [
    "BUILD_TIMEOUT_S",
    "cross_compiler",
    "cross_compiler_name",
    "DB_FORMAT",
    "default_schedule",
    "fuse",
    "fuse_passes",
    "HEAVY_OPS",
    "is_cross",
    "is_heavy",
    "model_key",
    "op_counts",
    "persistent_builder",
    "prim_funcs",
    "qdq_import_summary",
    "relax_from_proto",
    "SECONDS_PER_TRIAL",
    "target_json",
    "TaskInfo",
    "to_relax",
    "Tuner",
    "TuningDatabase",
    "TuningDeadline",
    "TuningSummary",
    "TVM_STATUSES",
    "tvm_target",
    "TvmArtifact",
    "TvmBackend",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt.backends.tvm' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"graphopt.backends.tvm.{_LAZY[name]}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ("tvm", "tvm_ffi"):
            raise
        raise BackendError(
            "the TVM backend needs Apache TVM: pip install 'graphopt[tvm]' "
            f"(apache-tvm 0.27, apache-tvm-ffi 0.1.14.post1, xgboost-cpu). ({exc})"
        ) from None
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from graphopt.backends.tvm.artifact import TvmArtifact
    from graphopt.backends.tvm.backend import TvmBackend
    from graphopt.backends.tvm.database import DB_FORMAT, TuningDatabase
    from graphopt.backends.tvm.lower import (
        cross_compiler,
        cross_compiler_name,
        fuse,
        fuse_passes,
        is_cross,
        op_counts,
        qdq_import_summary,
        relax_from_proto,
        target_json,
        to_relax,
        tvm_target,
    )
    from graphopt.backends.tvm.schedule import HEAVY_OPS, default_schedule, is_heavy, prim_funcs
    from graphopt.backends.tvm.tuner import (
        BUILD_TIMEOUT_S,
        SECONDS_PER_TRIAL,
        Tuner,
        TuningDeadline,
        model_key,
        persistent_builder,
    )

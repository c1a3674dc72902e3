"""Scheduling the fused TIR functions: database records where there are some, defaults elsewhere.

Untuned tasks are never silent: every fused TIR function is classified ``tuned`` (a database
record was applied), ``default`` (no record: MetaSchedule's own schedule rules applied with
sampled, unmeasured decisions, or DLight's CPU rules; elementwise tasks get this on purpose)
or ``naive`` (nothing could schedule it: plain loops). ``TvmArtifact.tasks`` and the report list
them, and an untuned heavy task logs a warning: TVM 0.27 untuned runs ResNet-18 ~100x slower
than ONNX Runtime.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax

from graphopt.backends.tvm.database import TuningDatabase
from graphopt.backends.tvm.summary import TVM_STATUSES, TaskInfo
from graphopt.backends.tvm.worker import import_tensor_intrinsics

log = logging.getLogger(__name__)

# op names whose fused tasks are worth tuning; the rest (elementwise, reshapes) get the default
# schedule, which is close to what tuning would find for memory-bound loops.
HEAVY_OPS = ("conv", "matmul", "dense", "pool", "mean", "sum", "softmax", "batch_matmul")


def schedule(
    fused: tvm.IRModule, database: TuningDatabase, target: tvm.target.Target, seed: int = 0
) -> tuple[tvm.IRModule, list[TaskInfo]]:
    """``fused`` with the database's records applied and a :func:`default_schedule` for every
    other task, and how each task was scheduled (tuned first, then default, then naive)."""
    with target, database.db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase()(fused)
    tasks: list[TaskInfo] = []
    originals = prim_funcs(fused)
    for name, func in prim_funcs(applied).items():
        heavy = is_heavy(name)
        if _scheduled(func):
            best = database.best_ms(originals[name]) if name in originals else None
            tasks.append(TaskInfo(name, "tuned", heavy, best))
            continue
        scheduled = default_schedule(func, target, seed)
        if scheduled is None:
            tasks.append(TaskInfo(name, "naive", heavy))
            continue
        applied[name] = scheduled
        tasks.append(TaskInfo(name, "default", heavy))
    return applied, sorted(tasks, key=lambda t: (TVM_STATUSES.index(t.status), t.name))


def prim_funcs(mod: tvm.IRModule) -> dict[str, Any]:
    return {
        gv.name_hint: func
        for gv, func in mod.functions.items()
        if isinstance(func, tvm.tirx.PrimFunc)
    }


def is_heavy(name: str) -> bool:
    return any(op in name for op in HEAVY_OPS)


def _scheduled(func: Any) -> bool:
    attrs = func.attrs
    return bool(attrs is not None and "tirx.is_scheduled" in attrs and attrs["tirx.is_scheduled"])


def default_schedule(func: Any, target: tvm.target.Target, seed: int = 0) -> Any | None:
    """A reasonable schedule for a task without a tuning record, chosen without measuring.

    CPU: MetaSchedule's own design space for ``target`` (multi-level tiling, parallelization,
    vectorization, unrolling) with its sampled decisions fixed by ``seed``; where no design
    space can be generated, DLight's CPU rules. GPU: DLight's GPU rules (thread bindings are
    required there, and DLight's are the tested defaults). ``None`` when nothing applies.
    """
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    if target.kind.name == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
        return _dlight(mod, target, rules + [dl.gpu.Fallback()])
    from tvm.s_tir import meta_schedule as ms

    import_tensor_intrinsics()
    try:
        ctx = ms.TuneContext(
            mod=mod,
            target=target,
            space_generator="post-order-apply",
            search_strategy="replay-trace",
            task_name="default",
            num_threads=1,
            rand_state=seed,
        )
        spaces = ctx.generate_design_space()
        if spaces:
            return spaces[0].mod["main"].with_attr("tirx.is_scheduled", True)
    except Exception as exc:  # a space that cannot be generated: try DLight
        log.debug("no MetaSchedule design space for a task: %s", exc)
    return _dlight(mod, target, [dl.cpu.GEMV(), dl.cpu.Reduction()])


def _dlight(mod: tvm.IRModule, target: tvm.target.Target, rules: list[Any]) -> Any | None:
    from tvm.s_tir import dlight as dl

    try:
        with target:
            scheduled = dl.ApplyDefaultSchedule(*rules)(mod)["main"]
    except Exception as exc:
        log.debug("DLight could not schedule a task: %s", exc)
        return None
    return scheduled if _scheduled(scheduled) else None

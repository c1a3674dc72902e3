"""TVM backend: FX graph -> Relax -> MetaSchedule-tuned library, run with the Relax VM.

Lowering: the rewritten FX graph goes through ``torch.export`` into Relax
(``from_exported_program``; where that fails, through the ONNX export and Relax's ``from_onnx``).
Weights are bound as constants, so an exported ``.so`` carries them.

Tuning: the module is legalized and fused first (``extract_tasks`` finds no tasks otherwise),
then MetaSchedule tunes the compute-heavy tasks (convolutions, matmuls, pooling, reductions)
under a budget in trials and/or minutes, with a progress bar. Records go to a JSON database on
disk, one per target, shared by every model: a second ``optimize()`` of the same model and
target finds its budget already spent there and compiles from the records without tuning. A
corrupt or foreign database (records for another target) is reported, moved aside and
replaced by a fresh one, never trusted and never a crash.

Untuned tasks are never silent: every fused TIR function is classified ``tuned`` (a database
record was applied), ``default`` (no record: MetaSchedule's own schedule rules applied with
sampled, unmeasured decisions, or DLight's CPU rules; elementwise tasks get this on purpose)
or ``naive`` (nothing could schedule it: plain loops). ``TvmArtifact.tasks`` and the report list
them, and an untuned heavy task logs a warning: TVM 0.27 untuned runs ResNet-18 ~100x slower
than ONNX Runtime.

Targets use TVM's dict form (MetaSchedule refuses ``llvm -mcpu=...`` strings and needs
``num-cores``); the host CPU is detected (``llvm_get_system_cpu``). Mobile targets cross-compile
(``-mtriple=aarch64-linux-gnu`` linked with ``aarch64-linux-gnu-gcc``; Android with the NDK from
``TVM_NDK_CC``) and are run, measured and tuned on a device through an RPC tracker
(:mod:`graphopt.backends.tvm_rpc`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from graphopt._util import cache_dir, first_line
from graphopt.backends._tvm_worker import CROSS_EXPORT, import_tensor_intrinsics, init_worker
from graphopt.backends.measure import (
    Latency,
    LatencyCache,
    available_cores,
    cache_key,
    cached_latency,
    time_callable,
    write_json_atomic,
)
from graphopt.backends.tvm_rpc import flatten_outputs
from graphopt.errors import BackendError
from graphopt.report import TVM_STATUSES
from graphopt.target import Target

log = logging.getLogger(__name__)

try:
    import tvm
    import tvm_ffi
    from tvm import relax
except ImportError as exc:  # pragma: no cover - exercised where the extra is missing
    raise BackendError(
        "the TVM backend needs Apache TVM: pip install 'graphopt[tvm]' "
        f"(apache-tvm 0.27, apache-tvm-ffi 0.1.14.post1, xgboost-cpu). ({exc})"
    ) from None

# op names whose fused tasks are worth tuning; the rest (elementwise, reshapes) get the default
# schedule, which is close to what tuning would find for memory-bound loops.
_QDQ_COMPUTE = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.matmul")
HEAVY_OPS = ("conv", "matmul", "dense", "pool", "mean", "sum", "softmax", "batch_matmul")
DB_FORMAT = 1
SECONDS_PER_TRIAL = 1.5  # measured here: ResNet-18 candidates, 2 cores, persistent builder
BUILD_TIMEOUT_S = 120.0  # MetaSchedule's 30 s default is less than a loaded 2-core machine needs


@dataclass
class TaskInfo:
    """One fused TIR function of the compiled module and how it was scheduled."""

    name: str
    status: str  # "tuned" | "default" | "naive"
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


# --------------------------------------------------------------------------- targets


def tvm_target(target: Target, cores: int | None = None) -> tvm.target.Target:
    """The TVM target (dict form) for a graphopt target, with the host CPU detected."""
    opts = dict(target.options)
    if target.device == "cuda":
        spec: dict[str, Any] = {"kind": "cuda", "host": _host_spec(cores)}
        if "arch" in opts:
            spec["arch"] = opts["arch"]
        elif tvm.cuda(target.index).exist:
            spec["arch"] = "sm_" + tvm.cuda(target.index).compute_version.replace(".", "")
        return tvm.target.Target(spec)
    if target.device == "mobile":
        spec = {"kind": "llvm", "mtriple": opts.get("mtriple", "aarch64-linux-gnu")}
        spec["mattr"] = opts.get("mattr", "+neon").split(",")
        if "mcpu" in opts:
            spec["mcpu"] = opts["mcpu"]
        spec["num-cores"] = int(opts.get("num-cores", cores or 4))
        return tvm.target.Target(spec)
    spec = _host_spec(cores)
    for key in ("mcpu", "mattr", "mtriple"):
        if key in opts:
            spec[key] = opts[key].split(",") if key == "mattr" else opts[key]
    if "num-cores" in opts:
        spec["num-cores"] = int(opts["num-cores"])
    return tvm.target.Target(spec)


def _host_spec(cores: int | None) -> dict[str, Any]:
    return {
        "kind": "llvm",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        "num-cores": int(cores or available_cores()),
    }


def is_cross(target: tvm.target.Target) -> bool:
    """True when code for ``target`` cannot run on this machine."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    return bool(triple) and not triple.startswith(os.uname().machine)


def target_json(target: tvm.target.Target) -> str:
    """The target as TVM prints it (``llvm -keys=cpu -mcpu=znver4 -num-cores=2``): the
    identity of a tuning database."""
    return str(target)


# --------------------------------------------------------------------------- lowering


def to_relax(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
) -> tvm.IRModule:
    """Import ``module`` into Relax with weights bound as constants and static input shapes."""
    from tvm.relax.frontend.torch import from_exported_program

    from graphopt.backends.onnxruntime import EXPORT_LOCK

    inputs = tuple(example_inputs)
    try:
        # torch.export shares global state with torch.onnx.export: one export at a time
        with EXPORT_LOCK, torch.no_grad():
            exported = torch.export.export(module, tuple(x.clone() for x in inputs))
            exported = exported.run_decompositions(_relax_decompositions())
        return from_exported_program(
            exported, keep_params_as_input=False, run_ep_decomposition=False
        )
    except Exception as exc:  # torch.export or the Relax importer: try the ONNX route
        first = first_line(exc, with_type=True)
    try:
        return _relax_from_onnx(module, inputs, input_names)
    except Exception as exc:
        raise BackendError(
            "TVM could not import the graph: torch.export -> Relax failed "
            f"({first}) and ONNX -> Relax failed ({first_line(exc, with_type=True)}). "
            "Use backend='onnxruntime'."
        ) from exc


def _relax_decompositions() -> dict[Any, Callable[..., Any]]:
    """torch.export's core-ATen decompositions, plus what TVM's importer would get wrong.

    TVM 0.27's ``from_exported_program`` reads only the two operands of these ops and drops
    their scalar arguments, so the artifact computed something else (issue 15, item 7):

        add(x, y, alpha=a)   -> x + a*y          sub(x, y, alpha=a) -> x - a*y
        rsub(x, y, alpha=a)  -> y - a*x
        elu(x, alpha, scale, input_scale)  (selu, celu)
            -> scale * where(x > 0, x, alpha * (exp(input_scale * x) - 1))

    With alpha = 1 (scale = input_scale = 1) the op is kept as it is.
    """
    from torch.export import default_decompositions

    aten = torch.ops.aten

    def scaled(y: Any, alpha: Any) -> Any:
        return y if alpha == 1 else aten.mul.Tensor(y, alpha)

    def add(x: Any, y: Any, alpha: Any = 1) -> Any:
        return NotImplemented if alpha == 1 else aten.add.Tensor(x, scaled(y, alpha))

    def sub(x: Any, y: Any, alpha: Any = 1) -> Any:
        return NotImplemented if alpha == 1 else aten.sub.Tensor(x, scaled(y, alpha))

    def rsub(x: Any, y: Any, alpha: Any = 1) -> Any:
        return aten.sub.Tensor(y, scaled(x, alpha))

    def elu(x: Any, alpha: Any = 1.0, scale: Any = 1.0, input_scale: Any = 1.0) -> Any:
        if scale == 1 and input_scale == 1:
            return NotImplemented
        negative = aten.mul.Tensor(
            aten.sub.Tensor(aten.exp.default(aten.mul.Tensor(x, input_scale)), 1), alpha
        )
        picked = aten.where.self(aten.gt.Scalar(x, 0), x, negative)
        return aten.mul.Tensor(picked, scale)

    table = default_decompositions()
    table.update(
        {
            aten.add.Tensor: add,
            aten.add.Scalar: add,
            aten.sub.Tensor: sub,
            aten.sub.Scalar: sub,
            aten.rsub.Tensor: rsub,
            aten.rsub.Scalar: rsub,
            aten.elu.default: elu,
        }
    )
    return table


def _relax_from_onnx(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: Sequence[str] | None
) -> tvm.IRModule:
    from graphopt.backends.onnxruntime import export_onnx

    proto = export_onnx(module, inputs, input_names=names, dynamic_batch=False)
    return relax_from_proto(proto, [tuple(x.shape) for x in inputs])


def relax_from_proto(proto: onnx.ModelProto, input_shapes: Sequence[tuple[int, ...]]) -> Any:
    """Import an ONNX model into Relax with static input shapes and weights as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    names = _onnx_inputs(proto)
    shapes = {n: list(s) for n, s in zip(names, input_shapes, strict=True)}
    mod = from_onnx(proto, shape_dict=shapes, keep_params_in_input=False)
    return relax.transform.DecomposeOpsForInference()(mod)


def _onnx_inputs(proto: onnx.ModelProto) -> list[str]:
    """The model's inputs that are not weights (older exports list weights as inputs too)."""
    weights = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in weights]


def _fold_shapes(proto: onnx.ModelProto, input_shapes: Sequence[tuple[int, ...]]) -> Any:
    """``proto`` with static input shapes and its constant subgraphs folded (Shape ->
    ConstantOfShape chains of a transformer export, which TVM's ONNX importer rejects), by ONNX
    Runtime's basic level: constant folding and semantics-preserving rewrites only (it leaves
    the weights' DequantizeLinear unfolded and moves Q/DQ pairs through data-movement ops)."""
    from graphopt.quant.qdq import ort_optimized_model

    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    wanted = set(_onnx_inputs(proto))
    inputs = [vi for vi in fixed.graph.input if vi.name in wanted]
    for vi, shape in zip(inputs, input_shapes, strict=True):
        dims = vi.type.tensor_type.shape.dim
        for d, size in zip(dims, shape, strict=True):
            d.Clear()
            d.dim_value = int(size)
    return ort_optimized_model(fixed, "basic")


def op_counts(mod: tvm.IRModule) -> Counter:
    """Relax operators called in ``mod``'s ``main`` (``relax.nn.conv2d``: 3, ...)."""
    counts: Counter = Counter()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            counts[expr.op.name] += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return counts


def qdq_import_summary(ops: Counter) -> str:
    """What TVM made of a QDQ graph: its quantize/dequantize ops and the compute between them.

    TVM 0.27's Relax ONNX frontend imports QuantizeLinear/DequantizeLinear as ``relax.quantize``
    / ``relax.dequantize`` and keeps Conv/MatMul/Gemm float: fake quantisation, no integer
    kernel. Said in the report so nobody expects int8 speed from it. ``ops``: op_counts of
    the imported module."""
    compute = {k.rsplit(".", 1)[-1]: v for k, v in ops.items() if k in _QDQ_COMPUTE}
    integer = ", ".join(f"{v} {k}" for k, v in sorted(compute.items())) or "no conv/matmul"
    return (
        f"TVM imports the QDQ graph as fake quantisation: {ops['relax.quantize']} quantize and "
        f"{ops['relax.dequantize']} dequantize around float compute ({integer}); TVM "
        f"{tvm.__version__}'s ONNX frontend has no integer conv/matmul kernel, so this runs at "
        "float speed or slower (ONNX Runtime runs the same model on integer kernels)."
    )


def fuse_passes() -> list[Any]:
    """Legalize and fuse: what ``extract_tasks`` and the database lookup both need to see."""
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(fuse_passes())(mod)


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


def model_key(fused: tvm.IRModule) -> str:
    """A key for the model's tuning problem: its fused task structures (weights excluded)."""
    parts = sorted(str(tvm_ffi.structural_hash(f)) for f in prim_funcs(fused).values())
    return hashlib.blake2b("|".join(parts).encode(), digest_size=12).hexdigest()


# --------------------------------------------------------------------------- default schedules


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


# --------------------------------------------------------------------------- database


class TuningDatabase:
    """A MetaSchedule JSON database in a directory, validated before TVM reads it.

    Layout: ``database_workload.json`` and ``database_tuning_record.json`` (MetaSchedule's own
    files) plus ``graphopt.json``: the format version, the target, and the tuning budget already
    spent per model key. A directory whose files do not parse, or whose target is another one,
    is moved aside (``<dir>.corrupt-<time>`` / ``<dir>.foreign-<time>``) with a warning, and a
    fresh database is started.
    """

    def __init__(self, path: str | Path, target: tvm.target.Target) -> None:
        self.path = Path(path)
        self.target = target
        self.warnings: list[str] = []
        self.meta = self._validate()
        try:
            self.db = self._open()
        except Exception as exc:  # TVM rejected files that parsed as JSON
            self._set_aside("corrupt", f"TVM could not read it ({exc})")
            self.meta = self._fresh_meta()
            self.db = self._open()

    def _open(self) -> Any:
        from tvm.s_tir import meta_schedule as ms

        return ms.database.JSONDatabase(
            path_workload=str(self.workload_file),
            path_tuning_record=str(self.record_file),
            allow_missing=True,
        )

    @property
    def workload_file(self) -> Path:
        return self.path / "database_workload.json"

    @property
    def record_file(self) -> Path:
        return self.path / "database_tuning_record.json"

    @property
    def meta_file(self) -> Path:
        return self.path / "graphopt.json"

    def _fresh_meta(self) -> dict[str, Any]:
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"format": DB_FORMAT, "target": target_json(self.target), "budgets": {}}
        self._write_meta(meta)
        return meta

    def _write_meta(self, meta: dict[str, Any]) -> None:
        write_json_atomic(self.meta_file, meta, indent=1)

    def _set_aside(self, kind: str, why: str) -> None:
        dest = self.path.with_name(f"{self.path.name}.{kind}-{int(time.time())}")
        message = (
            f"the TVM tuning database {self.path} is {kind}: {why}. It was moved to {dest} "
            "and is ignored; tuning starts from a fresh database."
        )
        log.warning(message)
        self.warnings.append(message)
        if self.path.exists():
            shutil.move(str(self.path), str(dest))

    def _validate(self) -> dict[str, Any]:
        if not self.path.exists() or not any(self.path.iterdir()):
            return self._fresh_meta()
        try:
            meta = json.loads(self.meta_file.read_text())
            if not isinstance(meta, dict) or meta.get("format") != DB_FORMAT:
                raise ValueError(f"graphopt.json is not format {DB_FORMAT}")
            if not isinstance(meta.get("budgets"), dict):
                raise ValueError("graphopt.json has no budgets")
            workloads = _json_lines(self.workload_file)
            records = _json_lines(self.record_file)
            for row in workloads:
                if not (isinstance(row, list) and len(row) == 2):
                    raise ValueError("a workload line is not [hash, module]")
            for row in records:
                if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], int)):
                    raise ValueError("a tuning record line is not [workload, record]")
                if not 0 <= row[0] < len(workloads):
                    raise ValueError("a tuning record points at a missing workload")
        except (OSError, ValueError) as exc:
            self._set_aside("corrupt", str(exc))
            return self._fresh_meta()
        if meta.get("target") != target_json(self.target):
            self._set_aside(
                "foreign",
                f"it holds records for target {meta.get('target')}, not {target_json(self.target)}",
            )
            return self._fresh_meta()
        return meta

    def budget_spent(self, key: str) -> dict[str, float]:
        return dict(self.meta["budgets"].get(key, {}))

    def add_budget(
        self, key: str, trials: int, seconds: float, minutes: float | None, exhausted: bool
    ) -> None:
        """Record tuning spent on ``key``: trials and seconds, ``minutes`` when a time budget
        ran out in full, ``exhausted`` when the search ran out of candidates before the budget
        did (a larger budget would find nothing more)."""
        spent = self.meta["budgets"].setdefault(key, {"trials": 0, "seconds": 0.0})
        spent["trials"] += trials
        spent["seconds"] += seconds
        if minutes is not None:
            spent["minutes"] = spent.get("minutes", 0.0) + minutes
        spent["exhausted"] = exhausted
        self._write_meta(self.meta)

    def best_ms(self, func: Any) -> float | None:
        """The best recorded time of a task, or None without a record."""
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        if not self.db.has_workload(mod):
            return None
        records = self.db.get_top_k(self.db.commit_workload(mod), 1)
        if not records or not records[0].run_secs:
            return None
        return float(np.mean([float(s) for s in records[0].run_secs])) * 1e3


def _json_lines(path: Path) -> list[Any]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name} line {n} is not JSON ({exc.msg})") from None
    return rows


# --------------------------------------------------------------------------- artifact


@dataclass
class TvmArtifact:
    """A compiled Relax VM executable: callable on numpy arrays, exportable as a ``.so``."""

    executable: Any
    target: tvm.target.Target
    input_shapes: list[tuple[int, ...]]
    tasks: list[TaskInfo]
    tuning: TuningSummary | None = None
    rpc: Any = None  # an RpcDevice: run and measure there
    imported_ops: Counter | None = None  # Relax ops of the imported model (ONNX loads)
    _vm: Any = None
    _dev: Any = None

    @property
    def cross_compiled(self) -> bool:
        return is_cross(self.target)

    @property
    def heavy_untuned(self) -> list[str]:
        """Compute-heavy tasks running a schedule no measurement chose."""
        return [t.name for t in self.tasks if t.heavy and t.status != "tuned"]

    def _local_vm(self) -> tuple[Any, Any]:
        if self._vm is None:
            if self.cross_compiled:
                raise BackendError(
                    f"this artifact is compiled for {self.target.attrs.get('mtriple')} and "
                    "cannot run on this machine; give the backend an RPC device "
                    "(rpc='host:port/key') to run it there, or save('model.so') and copy it."
                )
            self._dev = tvm.cuda(0) if self.target.kind.name == "cuda" else tvm.cpu(0)
            self._vm = relax.VirtualMachine(self.executable, self._dev)
        return self._vm, self._dev

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.rpc is not None:
            from graphopt.backends.tvm_rpc import run_library

            with tempfile.TemporaryDirectory() as tmp:
                lib = self.save(Path(tmp) / "model.so")
                return run_library(lib, list(arrays), self.rpc)
        vm, dev = self._local_vm()
        if len(arrays) != len(self.input_shapes):
            raise BackendError(f"expected {len(self.input_shapes)} inputs, got {len(arrays)}.")
        for i, (a, want) in enumerate(zip(arrays, self.input_shapes, strict=True)):
            if tuple(a.shape) != tuple(want):
                raise BackendError(
                    f"input {i} has shape {list(a.shape)}; the TVM artifact was compiled for "
                    f"{list(want)} (shapes are static); optimize again with that shape."
                )
        args = [tvm.runtime.tensor(np.asarray(a, order="C"), device=dev) for a in arrays]
        try:
            out = vm["main"](*args)
        except Exception as exc:
            raise BackendError(f"the TVM VM failed to run the model: {exc}") from exc
        return flatten_outputs(out)  # the one flattener, shared with remote runs

    def save(self, path: str | Path) -> Path:
        """Write a shared library (weights embedded) that TVM's runtime alone can load."""
        path = Path(path)
        if path.suffix != ".so":
            raise BackendError(f"the TVM backend saves shared libraries: name it '*.so' ({path}).")
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if self.cross_compiled:
            kwargs["fcompile"] = cross_compiler(self.target)
        try:
            self.executable.export_library(str(path), **kwargs)
        except Exception as exc:
            raise BackendError(f"exporting the TVM library failed: {exc}") from exc
        return path


def cross_compiler_name(target: tvm.target.Target) -> str:
    """The gcc that links for ``target``'s triple, or a BackendError saying what to install."""
    triple = str(target.attrs.get("mtriple", "")) or "aarch64-linux-gnu"
    compiler = f"{triple}-gcc"
    if shutil.which(compiler) is None:
        raise BackendError(
            f"linking for {triple} needs the cross compiler {compiler}: on Debian/Ubuntu "
            f"`apt-get install gcc-{triple}`."
        )
    return compiler


def cross_compiler(target: tvm.target.Target) -> Callable[..., Any]:
    """The linker for a cross-compiled library, or a BackendError saying what to install."""
    from tvm.support import cc, ndk

    triple = str(target.attrs.get("mtriple", ""))
    if "android" in triple:
        if not os.environ.get("TVM_NDK_CC"):
            raise BackendError(
                "linking for Android needs the NDK's clang: set TVM_NDK_CC to "
                "<ndk>/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang."
            )
        return ndk.create_shared
    return cc.cross_compiler(cross_compiler_name(target))


# --------------------------------------------------------------------------- the backend


class TvmBackend:
    """Lower to TVM for the target, tune with MetaSchedule, run, measure, export.

    ``trials`` / ``minutes``: the tuning budget (0 / None: no tuning; records already in the
    database are applied either way). ``database``: the database directory (default: one per
    target under the cache directory). ``rpc``: an :class:`~graphopt.backends.tvm_rpc.RpcDevice`
    or ``"host:port/key"``: tune, run and measure on that device.

    >>> backend = TvmBackend(Target.parse("cpu"), trials=200)
    >>> artifact = backend.compile(gm, (x,))
    >>> backend.measure(artifact, (x,)).median_ms
    """

    name = "tvm"

    def __init__(
        self,
        target: Target | str = "cpu",
        *,
        trials: int = 0,
        minutes: float | None = None,
        database: str | Path | None = None,
        rpc: Any = None,
        progress: bool = False,
        seed: int = 0,
        cache: LatencyCache | None = None,
        cores: int | None = None,
    ) -> None:
        from graphopt.backends.tvm_rpc import RpcDevice

        self.target = Target.parse(target)
        if trials < 0 or (minutes is not None and minutes <= 0):
            raise BackendError("the tuning budget must be trials >= 0 and minutes > 0.")
        self.trials = int(trials)
        self.minutes = minutes
        if self.minutes is not None and not self.trials:
            self.trials = 100_000  # bounded by time alone
        self.rpc = RpcDevice.parse(rpc) if isinstance(rpc, str) else rpc
        self.progress = progress
        self.seed = seed
        self.cache = cache
        self.tvm_target = tvm_target(self.target, cores)
        if self.target.device == "cuda" and not tvm.cuda(self.target.index).exist:
            raise BackendError(
                "target 'cuda' with the TVM backend needs an NVIDIA GPU and a CUDA-enabled TVM "
                "build; none is visible here. Use target 'cpu'."
            )
        if self.target.device == "mobile" and (self.trials or self.minutes) and self.rpc is None:
            raise BackendError(
                f"tuning for {self.target} measures on the device: pass rpc='host:9190/key' "
                "with a phone or board registered at an RPC tracker (see the README)."
            )
        self.database_path = Path(database) if database else self._default_database()
        self.threads = int(self.tvm_target.attrs.get("num-cores", 0) or 0)

    @property
    def version(self) -> str:
        return tvm.__version__

    def expected_trials(self) -> int:
        """The trials the budget allows: ``trials``, or what ``minutes`` buys at ~1.5 s each.

        Sizes MetaSchedule's batches so that every task gets a first batch early and the
        gradient-based scheduler has budget left to spend where it pays.
        """
        by_time = int(self.minutes * 60 / SECONDS_PER_TRIAL) if self.minutes else self.trials
        return max(1, min(self.trials, by_time))

    def without_tuning(self) -> TvmBackend:
        """A copy that applies the database but never tunes (for probes such as bisection)."""
        quiet = copy.copy(self)
        quiet.trials, quiet.minutes, quiet.progress = 0, None, False
        return quiet

    def settings(self) -> dict[str, Any]:
        return {"target": target_json(self.tvm_target), "rpc": self.rpc and self.rpc.describe()}

    def _default_database(self) -> Path:
        digest = hashlib.blake2b(
            (target_json(self.tvm_target) + tvm.__version__).encode(), digest_size=8
        ).hexdigest()
        return cache_dir() / "tvm" / f"db-{digest}"

    # ---- lowering

    def compile(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        **_: Any,
    ) -> TvmArtifact:
        """Import, tune within the budget, apply the database, schedule the rest, build."""
        mod = to_relax(module, example_inputs, input_names=input_names)
        return self.compile_relax(mod, [tuple(x.shape) for x in example_inputs])

    def load(
        self, proto: onnx.ModelProto, input_shapes: Sequence[tuple[int, ...]] | None = None
    ) -> TvmArtifact:
        """Compile an ONNX model (e.g. the int8 QDQ model) for ``input_shapes`` (TVM compiles
        static shapes: required)."""
        if input_shapes is None:
            raise BackendError("the TVM backend compiles static shapes: pass input_shapes.")
        if len(names := _onnx_inputs(proto)) != len(input_shapes):
            raise BackendError(
                f"the ONNX model takes {len(names)} input(s) {names}, but {len(input_shapes)} "
                "input shape(s) were given: give one static shape per model input, in order."
            )
        try:
            mod = relax_from_proto(proto, input_shapes)
        except Exception as exc:
            first = first_line(exc, with_type=True)
            try:  # shape arithmetic TVM's importer rejects, folded away at the static shapes
                mod = relax_from_proto(_fold_shapes(proto, input_shapes), input_shapes)
            except Exception as again:
                raise BackendError(
                    f"TVM could not import the ONNX model ({first}; with its shape arithmetic "
                    f"folded: {first_line(again, with_type=True)}). Use backend='onnxruntime'."
                ) from again
        artifact = self.compile_relax(mod, [tuple(s) for s in input_shapes])
        artifact.imported_ops = op_counts(mod)
        return artifact

    def compile_relax(self, mod: tvm.IRModule, input_shapes: list[tuple[int, ...]]) -> TvmArtifact:
        try:
            fused = fuse(mod, self.tvm_target)
        except Exception as exc:  # TVM's legalization raises its own (and plain) errors
            raise BackendError(
                f"TVM could not lower the model ({first_line(exc, with_type=True)}). Use "
                "backend='onnxruntime' for this model."
            ) from exc
        database = TuningDatabase(self.database_path, self.tvm_target)
        tuning = self.tune(fused, database)
        tuning.warnings[:0] = database.warnings
        scheduled, tasks = self._schedule(fused, database)
        with self.tvm_target, tvm.transform.PassContext(opt_level=3):
            try:
                executable = tvm.compile(
                    scheduled, target=self.tvm_target, relax_pipeline=_lower_pipeline()
                )
            except Exception as exc:
                raise BackendError(
                    f"TVM failed to build the module: {first_line(exc, with_type=True)}. TVM "
                    f"{tvm.__version__} cannot lower an operator of this model; use "
                    "backend='onnxruntime' for it."
                ) from exc
        artifact = TvmArtifact(executable, self.tvm_target, input_shapes, tasks, tuning, self.rpc)
        if heavy := artifact.heavy_untuned:
            log.warning(
                "TVM: %d compute-heavy task(s) run untuned schedules (%s); tune with trials=N "
                "or minutes=M for competitive latency.",
                len(heavy),
                ", ".join(heavy[:5]) + ("..." if len(heavy) > 5 else ""),
            )
        return artifact

    def _schedule(
        self, fused: tvm.IRModule, database: TuningDatabase
    ) -> tuple[tvm.IRModule, list[TaskInfo]]:
        with self.tvm_target, database.db, tvm.transform.PassContext(opt_level=3):
            applied = relax.transform.MetaScheduleApplyDatabase()(fused)
        tasks: list[TaskInfo] = []
        originals = prim_funcs(fused)
        for name, func in prim_funcs(applied).items():
            heavy = is_heavy(name)
            if _scheduled(func):
                best = database.best_ms(originals[name]) if name in originals else None
                tasks.append(TaskInfo(name, "tuned", heavy, best))
                continue
            scheduled = default_schedule(func, self.tvm_target, self.seed)
            if scheduled is None:
                tasks.append(TaskInfo(name, "naive", heavy))
                continue
            applied[name] = scheduled
            tasks.append(TaskInfo(name, "default", heavy))
        return applied, sorted(tasks, key=lambda t: (TVM_STATUSES.index(t.status), t.name))

    # ---- tuning

    def tune(self, fused: tvm.IRModule, database: TuningDatabase) -> TuningSummary:
        """Tune ``fused``'s heavy tasks within the budget, unless the database already has it."""
        summary = TuningSummary(
            database=str(database.path),
            trials_requested=self.trials,
            minutes_requested=self.minutes,
        )
        if not self.trials:
            return summary
        from tvm.s_tir import meta_schedule as ms

        key = model_key(fused)
        spent = database.budget_spent(key)
        tasks = [
            t
            for t in ms.relax_integration.extract_tasks(fused, self.tvm_target)
            if is_heavy(t.task_name)
        ]
        if not tasks:
            summary.warnings.append("no compute-heavy tasks to tune")
            return summary
        # the records behind a recorded budget must still be there (not a wiped records file)
        covered = any(database.best_ms(t.dispatched[0]["main"]) is not None for t in tasks)
        enough_trials = spent.get("trials", 0) >= self.trials
        enough_time = self.minutes is not None and spent.get("minutes", 0) >= self.minutes
        if spent and (enough_trials or enough_time or spent.get("exhausted")) and covered:
            summary.reused = True
            return summary
        tracker = self._run_tuner(tasks, database)
        summary.curve = tracker.curve
        summary.trials_run = tracker.trials
        summary.failed_trials = tracker.failed
        summary.seconds = tracker.seconds
        summary.tasks_tuned = len(tasks)
        if tracker.first_error:
            summary.warnings.append(
                f"{tracker.failed} of {tracker.trials} trials failed; the first: "
                f"{tracker.first_error}"
            )
        exhausted = tracker.trials < self.trials and not tracker.deadline_hit
        minutes = self.minutes if tracker.deadline_hit else None
        database.add_budget(key, summary.trials_run, summary.seconds, minutes, exhausted)
        return summary

    def _run_tuner(self, tasks: list[Any], database: TuningDatabase) -> _TuningTracker:
        from tvm.s_tir import meta_schedule as ms

        import_tensor_intrinsics()
        work_dir = database.path / "work"
        work_dir.mkdir(parents=True, exist_ok=True)
        budget = self.expected_trials()
        # MetaSchedule's console handler takes this logger's level: INFO floods the terminal
        # (the full logs still go to <database>/work/logs). graphopt -v keeps them.
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        ms_logger.setLevel(logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING)
        # MetaSchedule re-configures this logger on every tuning and lists its handlers by name;
        # an unnamed one (pytest's capture handler, say) makes that crash on the second run in
        # a process. Its own handlers are named and recreated from the configuration.
        for handler in [h for h in ms_logger.handlers if not h.get_name()]:
            ms_logger.removeHandler(handler)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(work_dir), strategy=_search_strategy(budget, len(tasks)), seed=self.seed
        )
        per_iter = max(2, min(64, budget // (2 * len(tasks))))
        tracker = _TuningTracker(
            [t.task_name for t in tasks],
            [float(w) for w in weights],
            self.trials,
            self.minutes,
            self.progress,
        )
        runner: Any = ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S)
        if self.rpc is not None:
            from graphopt.backends.tvm_rpc import meta_schedule_runner

            runner = meta_schedule_runner(self.rpc)
        builder = persistent_builder(
            cross_compiler_name(self.tvm_target) if is_cross(self.tvm_target) else None
        )
        start = time.perf_counter()
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(work_dir),
                max_trials_global=self.trials,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=runner,
                database=database.db,
                measure_callbacks=ms.MeasureCallback.create("default") + [tracker.callback()],
            )
        except Exception as exc:
            if not tracker.deadline_hit:  # the deadline arrives as an exception, by design
                raise BackendError(f"MetaSchedule tuning failed: {exc}") from exc
        finally:
            tracker.close()
        tracker.seconds = time.perf_counter() - start
        return tracker

    # ---- measurement

    def measure(
        self,
        model: TvmArtifact | torch.nn.Module,
        inputs: Sequence[Any],
        *,
        warmup: int = 5,
        runs: int = 50,
        max_time_s: float = 10.0,
        use_cache: bool = True,
    ) -> Latency:
        """Median latency of one call of ``model`` on ``inputs`` (here, or on the RPC device).

        Same shape as the ONNX Runtime backend's ``measure``: a module is compiled first; the
        disk cache keys on the compiled library's bytes, the target and the input shapes.
        """
        from graphopt.backends.onnxruntime import to_numpy

        arrays = [to_numpy(x) for x in inputs]
        if isinstance(model, torch.nn.Module):
            model = self.compile(model, [torch.from_numpy(a) for a in arrays])
        with tempfile.TemporaryDirectory() as tmp:
            lib = model.save(Path(tmp) / "model.so")
            digest = hashlib.blake2b(lib.read_bytes(), digest_size=16).hexdigest()
            key = cache_key(
                model=digest,
                target=target_json(self.tvm_target),
                backend=self.name,
                version=self.version,
                rpc=self.rpc.describe() if self.rpc else None,
                shapes=[(a.shape, str(a.dtype)) for a in arrays],
                runs=runs,
                warmup=warmup,
            )

            def measure() -> Latency:
                if self.rpc is not None:
                    from graphopt.backends.tvm_rpc import measure_library

                    return measure_library(lib, arrays, self.rpc, repeat=max(5, runs // 5))
                return time_callable(
                    lambda: model.run(arrays), warmup=warmup, runs=runs, max_time_s=max_time_s
                )

            return cached_latency(key, measure, self.cache, use_cache)


def _lower_pipeline() -> Any:
    """Relax lowering after fusion and scheduling: the generic dataflow-lower and finalize
    stages (what MetaSchedule's ``compile_relax`` uses for targets without their own)."""
    return tvm.transform.Sequential(
        [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
    )


def _search_strategy(trials: int, n_tasks: int) -> Any:
    """Evolutionary search sized to the budget.

    MetaSchedule's defaults (population 512, 4 genetic iterations) cost 5-18 s of search per
    batch on 2 cores, which dominates small batches; a budget of a few hundred trials does
    better spending that time on measured candidates.
    """
    from tvm.s_tir import meta_schedule as ms

    per_task = trials / max(1, n_tasks)
    small = per_task < 64
    return ms.search_strategy.EvolutionarySearch(
        population_size=128 if small else 512,
        init_min_unmeasured=32 if small else 50,
        genetic_num_iters=2 if small else 4,
    )


def persistent_builder(cross_cc: str | None = None, recycle_every: int = 25) -> Any:
    """A MetaSchedule builder whose worker processes live across batches.

    ``LocalBuilder`` starts a fresh process pool for every batch (against a memory leak in
    long-lived workers); each worker then imports TVM and its tensor intrinsics before building:
    6-8 s per batch here, more than the builds. This pool is kept and recycled every
    ``recycle_every`` batches instead, and its workers start through :func:`init_worker`.
    ``cross_cc``: link candidates with that cross compiler (the workers register the export).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import (
        _serialize_params,
        _worker_func,
    )
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _PersistentBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool: Any = None
            self.batches = 0

        def _get_pool(self) -> Any:
            if self.pool is None or self.batches >= recycle_every:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = PopenPoolExecutor(
                    max_workers=available_cores(),
                    timeout=BUILD_TIMEOUT_S,
                    initializer=functools.partial(init_worker, cross_cc),
                )
                self.batches = 0
            self.batches += 1
            return self.pool

        def build(self, build_inputs: list[Any]) -> list[Any]:
            pool = self._get_pool()
            jobs = [
                (
                    None,
                    CROSS_EXPORT if cross_cc else None,
                    b.mod,
                    b.target,
                    _serialize_params(b.params),
                )
                for b in build_inputs
            ]
            results = []
            for result in pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
                if result.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(result.value, None))
                elif result.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"timeout after {BUILD_TIMEOUT_S} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {result.value}"))
            return results

    return _PersistentBuilder()


class TuningDeadline(Exception):
    """Raised from MetaSchedule's measure callback to end tuning when the time is up."""


class _TuningTracker:
    """Counts trials, enforces the time budget, draws the progress bar, records the curve.

    The curve is MetaSchedule's own estimate after each batch: the weighted sum of every task's
    best measured time so far (``est_ms``, recorded once every task has one measurement).
    """

    def __init__(
        self,
        names: list[str],
        weights: list[float],
        trials: int,
        minutes: float | None,
        progress: bool,
    ) -> None:
        self.names = names
        self.weights = weights
        self.best: dict[int, float] = {}
        self.trials = 0
        self.failed = 0
        self.first_error: str | None = None
        self.seconds = 0.0
        self.deadline_hit = False
        self.curve: list[dict[str, float]] = []
        self.deadline = time.perf_counter() + minutes * 60 if minutes else None
        self.start = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm import tqdm

            total = None if minutes and trials >= 100_000 else trials
            self.bar = tqdm(total=total, desc="tuning", unit="trial", leave=True)

    def callback(self) -> Any:
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        tracker = self

        @derived_object
        class _Callback(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, candidates, builds, runs) -> None:  # noqa: ANN001
                tracker.update(task_scheduler, int(task_id), builds, runs)

        return _Callback()

    def update(self, scheduler: Any, task_id: int, builds: Any, runs: Any) -> None:
        for build, run in zip(builds, runs, strict=False):
            self.trials += 1
            if build.error_msg or run.error_msg or not run.run_secs:
                self.failed += 1
                if self.first_error is None:
                    error = str(build.error_msg or run.error_msg or "no run time")
                    self.first_error = f"{self.names[task_id]}: {error.strip()[-600:]}"
                continue
            secs = float(np.mean([float(s) for s in run.run_secs]))
            if secs < self.best.get(task_id, float("inf")):
                self.best[task_id] = secs
        estimate = None
        if len(self.best) == len(self.names):
            estimate = sum(self.weights[i] * s for i, s in self.best.items()) * 1e3
        elapsed = time.perf_counter() - self.start
        point = {"trials": float(self.trials), "seconds": round(elapsed, 2)}
        if estimate is not None:
            point["est_ms"] = round(estimate, 4)
        self.curve.append(point)
        if self.bar is not None:
            self.bar.n = self.trials
            self.bar.set_postfix_str(
                f"{self.names[task_id][:28]}" + (f" est {estimate:.2f} ms" if estimate else "")
            )
            self.bar.refresh()
        if self.deadline is not None and time.perf_counter() > self.deadline:
            # Terminating tasks from here is unsafe: the gradient scheduler hands out the task
            # whose results this callback reports right after it returns, and MetaSchedule
            # aborts on a terminated one. Raising stops tune_tasks; the records measured so far
            # are already in the database (AddToDatabase runs before this callback).
            self.deadline_hit = True
            raise TuningDeadline(f"time budget reached after {self.trials} trials")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

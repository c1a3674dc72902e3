"""TVM lowering: graphopt targets as TVM targets, FX/ONNX -> Relax, fusion, the final pipeline.

Lowering: the rewritten FX graph goes through ``torch.export`` into Relax
(``from_exported_program``; where that fails, through the ONNX export and Relax's ``from_onnx``).
Weights are bound as constants, so an exported ``.so`` carries them. The module is then
legalized and fused (what MetaSchedule's ``extract_tasks`` and the database lookup both need to
see); after scheduling, :func:`lower_pipeline` lowers it for the Relax VM.

Targets use TVM's dict form (MetaSchedule refuses ``llvm -mcpu=...`` strings and needs
``num-cores``); the host CPU is detected (``llvm_get_system_cpu``). Mobile targets cross-compile
(``-mtriple=aarch64-linux-gnu`` linked with ``aarch64-linux-gnu-gcc``; Android with the NDK from
``TVM_NDK_CC``).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import onnx
import torch
import tvm
from tvm import relax

from graphopt._util import first_line
from graphopt.backends.export import EXPORT_LOCK, export_onnx
from graphopt.backends.measure import available_cores
from graphopt.backends.onnxruntime import ort_optimized_model
from graphopt.errors import BackendError
from graphopt.target import Target

# the compute ops whose float kernels a QDQ graph's fake quantisation surrounds
_QDQ_COMPUTE = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.matmul")


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
    proto = export_onnx(module, inputs, input_names=names, dynamic_axes={})
    return relax_from_proto(proto, [tuple(x.shape) for x in inputs])


def relax_from_proto(proto: onnx.ModelProto, input_shapes: Sequence[tuple[int, ...]]) -> Any:
    """Import an ONNX model into Relax with static input shapes and weights as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    names = onnx_inputs(proto)
    shapes = {n: list(s) for n, s in zip(names, input_shapes, strict=True)}
    mod = from_onnx(proto, shape_dict=shapes, keep_params_in_input=False)
    return relax.transform.DecomposeOpsForInference()(mod)


def onnx_inputs(proto: onnx.ModelProto) -> list[str]:
    """The model's inputs that are not weights (older exports list weights as inputs too)."""
    weights = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in weights]


def fold_shapes(proto: onnx.ModelProto, input_shapes: Sequence[tuple[int, ...]]) -> Any:
    """``proto`` with static input shapes and its constant subgraphs folded (Shape ->
    ConstantOfShape chains of a transformer export, which TVM's ONNX importer rejects), by ONNX
    Runtime's basic level: constant folding and semantics-preserving rewrites only (it leaves
    the weights' DequantizeLinear unfolded and moves Q/DQ pairs through data-movement ops)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    wanted = set(onnx_inputs(proto))
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


def lower_pipeline() -> Any:
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

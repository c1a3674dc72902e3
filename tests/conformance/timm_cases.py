"""timm's architectures for the conformance suite: the list, how each is built, how one runs.

Shared by tests/conformance/test_timm.py and benchmarks/conformance_timm.py. Each model is
built with random weights (``pretrained=False``, seeded) and random BatchNorm statistics and
affine parameters (never identity BN), in eval mode, at a small input where the model allows.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

import graphopt
from graphopt.core.numerics import Numerics, Rounding, run_module
from graphopt.errors import GraphoptError, InternalError

SEED = 0


@dataclass(frozen=True)
class Case:
    """One architecture: timm's name, its family, the input side, create_model's kwargs."""

    name: str
    family: str
    size: int = 64
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch: int = 1

    def __str__(self) -> str:
        return self.name


def _vit(size: int) -> dict[str, Any]:
    return {"img_size": size}


# fmt: off
CASES = [
    Case("resnet10t", "resnet", 32),
    Case("resnext26ts", "resnext"),
    Case("regnetx_002", "regnet"),
    Case("regnety_002", "regnet (SE)"),
    Case("efficientnet_b0", "efficientnet"),
    Case("efficientnet_lite0", "efficientnet-lite"),
    Case("tf_efficientnet_b0", "efficientnet (tf, same padding)"),
    Case("tf_efficientnetv2_b0", "efficientnetv2 (tf)"),
    Case("mobilenetv1_100", "mobilenetv1"),
    Case("mobilenetv2_050", "mobilenetv2", 32, batch=2),
    Case("mobilenetv3_small_050", "mobilenetv3", 32),
    Case("tf_mobilenetv3_small_minimal_100", "mobilenetv3 (tf minimal)"),
    Case("tf_mobilenetv3_small_075", "mobilenetv3 (tf)"),
    Case("mobilenetv4_conv_small", "mobilenetv4"),
    Case("ghostnet_050", "ghostnet"),
    Case("ghostnetv2_100", "ghostnetv2"),
    Case("repghostnet_050", "repghost"),
    Case("repvgg_a0", "repvgg"),
    Case("mobileone_s0", "mobileone"),
    Case("fastvit_t8", "fastvit"),
    Case("repvit_m0_9", "repvit"),
    Case("convnext_atto", "convnext"),
    Case("convnextv2_atto", "convnextv2"),
    Case("densenet121", "densenet"),
    Case("dla46_c", "dla"),
    Case("dpn48b", "dpn"),
    Case("hrnet_w18_small", "hrnet"),
    Case("inception_v3", "inception", 96),
    Case("legacy_xception", "xception"),
    Case("xception41", "xception (aligned)"),
    Case("vgg11_bn", "vgg (bn)", 32),
    Case("rexnet_100", "rexnet"),
    Case("mixnet_s", "mixnet"),
    Case("tf_mixnet_s", "mixnet (tf)"),
    Case("mnasnet_small", "mnasnet"),
    Case("lcnet_050", "lcnet", 32),
    Case("hardcorenas_a", "hardcorenas"),
    Case("tinynet_e", "tinynet", 32),
    Case("fbnetc_100", "fbnet"),
    Case("spnasnet_100", "spnasnet"),
    Case("res2net50_14w_8s", "res2net"),
    Case("resnest14d", "resnest"),
    Case("skresnet18", "sknet"),
    Case("cspresnet50", "cspnet"),
    Case("cs3darknet_focus_s", "cspnet (cs3, focus)"),
    Case("darknet17", "darknet"),
    Case("selecsls42b", "selecsls"),
    Case("ese_vovnet19b_slim_dw", "vovnet"),
    Case("nf_regnet_b0", "nfnet (regnet)"),
    Case("dm_nfnet_f0", "nfnet"),
    Case("resnetv2_18", "resnetv2 (pre-act)"),
    Case("seresnext26d_32x4d", "senet"),
    Case("ecaresnet26t", "ecanet"),
    Case("gernet_s", "gernet (byobnet)"),
    Case("hgnetv2_b0", "hgnet"),
    Case("efficientformer_l1", "efficientformer", 224),
    Case("efficientformerv2_s0", "efficientformerv2", 64, _vit(64)),
    Case("levit_128s", "levit", 64, _vit(64)),
    Case("vit_tiny_patch16_224", "vit", 64, _vit(64)),
    Case("deit_tiny_patch16_224", "deit", 64, _vit(64)),
    Case("swin_tiny_patch4_window7_224", "swin", 64, {"img_size": 64, "window_size": 2}),
    Case("maxvit_nano_rw_256", "maxvit", 64, _vit(64)),
    Case("coatnet_nano_rw_224", "coatnet", 64, _vit(64)),
    Case("mobilevit_xxs", "mobilevit"),
    Case("mobilevitv2_050", "mobilevitv2"),
    Case("poolformer_s12", "poolformer"),
    Case("edgenext_xx_small", "edgenext"),
    Case("inception_next_atto", "inception-next"),
    Case("starnet_s050", "starnet"),
    Case("efficientvit_m0", "efficientvit (msra)", 64, _vit(64)),
    Case("efficientvit_b0", "efficientvit (mit)"),
]
# fmt: on

# the CI-fast subset: small models at small inputs, ~60 s together on one core
FAST = ("resnet10t", "mobilenetv3_small_050", "lcnet_050", "tinynet_e", "mobilenetv2_050")
# timm's re-parameterizable families: compared with timm's own reparameterize_model
# also through the ONNX path: torch.onnx.export, then optimize the .onnx (slow)
ONNX_CASES = (
    "resnet10t",
    "repvgg_a0",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "convnext_atto",
    "vit_tiny_patch16_224",
)
REPARAM = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m0_9")


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def randomize_batchnorm(model: nn.Module, seed: int = SEED) -> int:
    """Random running statistics and affine parameters for every BatchNorm (never identity BN);
    returns how many were set."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            if module.running_mean is not None:
                n = module.running_mean.numel()
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if module.weight is not None:
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            count += 1
    return count


def build(timm: ModuleType, c: Case) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode model with random weights and BN statistics, and a seeded example input."""
    torch.manual_seed(SEED)
    model = timm.create_model(c.name, pretrained=False, **dict(c.kwargs)).eval()
    randomize_batchnorm(model)
    gen = torch.Generator().manual_seed(SEED + 1)
    return model, (torch.randn(c.batch, 3, c.size, c.size, generator=gen),)


_CONV = {"conv1d", "conv2d", "conv3d", "conv", "convolution", "_convolution"}


def _op(key: str) -> str:
    """An op-count key without its method dot and ATen overload (``conv2d.default``)."""
    return key.lstrip(".").split(".")[0].lower()


def conv_count(ops: Mapping[str, int]) -> int:
    """Convolutions in a report's op counts (modules, functions, ATen ops, ONNX Conv)."""
    return sum(n for k, n in ops.items() if _op(k) in _CONV)


def bn_count(ops: Mapping[str, int]) -> int:
    """BatchNorms in a report's op counts (modules of any BatchNorm class, functional calls)."""
    return sum(n for k, n in ops.items() if "batchnorm" in _op(k).replace("_", ""))


def module_counts(model: nn.Module) -> tuple[int, int]:
    """(convs, BatchNorms) among an nn.Module's submodules."""
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return convs, bns


@dataclass
class Outcome:
    """What optimize() did with one model."""

    case: Case
    path: str  # "nn.Module" or "onnx"
    # "ok"; "refused": a GraphoptError; "failed": a raw crash (or graphopt's InternalError) or an
    # artifact outside the exact contract; "export-failed": torch.onnx.export's failure
    status: str
    reason: str = ""
    convs: tuple[int, int] = (0, 0)  # before, after
    bns: tuple[int, int] = (0, 0)
    error: str = ""  # the artifact's end-to-end error against the original
    seconds: float = 0.0
    conv_bn_left: int = 0  # BatchNorms left right after a conv or linear (through reshapes)
    rolled_back: tuple[str, ...] = ()  # passes that failed or were rolled back
    report: Any = None  # optimize()'s report when it returned

    def row(self) -> str:
        status = self.status if not self.reason else f"{self.status}: {self.reason}"
        if self.rolled_back:
            status += f" (rolled back: {', '.join(self.rolled_back)})"
        status = status.replace("|", "/").replace("\n", " ")
        return (
            f"| {self.case.name} | {self.case.family} | {self.path} | {status} | "
            f"{self.convs[0]} -> {self.convs[1]} | {self.bns[0]} -> {self.bns[1]} | "
            f"{self.conv_bn_left} | {self.error} | {self.seconds:.0f} |"
        )


TABLE_HEADER = (
    "| model | family | path | status | convs before -> after | BN before -> after | "
    "conv/linear+BN left | end-to-end error | s |\n|---|---|---|---|---|---|---|---|---|"
)
_RESHAPES = {"view", "reshape", "flatten", "contiguous", "unflatten", "getitem"}
_LAYERS = _CONV | {"linear"}


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "bn"
        return "layer" if isinstance(module, nn.modules.conv._ConvNd | nn.Linear) else ""
    if node.op in ("call_function", "call_method"):
        name = _op(getattr(node.target, "__name__", str(node.target)))
        if "batchnorm" in name.replace("_", ""):
            return "bn"
        return "layer" if name in _LAYERS else "reshape" if name in _RESHAPES else ""
    return ""


def conv_bn_left(gm: fx.GraphModule) -> int:
    """BatchNorms of ``gm`` fed only by a conv's or linear's output, through reshapes, or by a
    concat of such outputs (MixNet's per-group convs): the pairs fold-conv-bn should fold. A
    layer whose output has another real user (a shortcut) is no pair; a metadata read (timm's
    ``_assert(x.ndim == 4)``, ``x.shape``) is no real user."""
    return sum(
        _from_layers(gm, node.args[0], node)
        for node in gm.graph.nodes
        if _kind(gm, node) == "bn" and node.args and isinstance(node.args[0], fx.Node)
    )


def _from_layers(gm: fx.GraphModule, node: fx.Node, user: fx.Node) -> bool:
    if [u for u in node.users if not _reads_metadata(u, node)] != [user]:
        return False
    kind = _kind(gm, node)
    if kind == "layer":
        return True
    if kind == "reshape" and node.args and isinstance(node.args[0], fx.Node):
        return _from_layers(gm, node.args[0], node)
    is_cat = node.op == "call_function" and _op(getattr(node.target, "__name__", "")) == "cat"
    parts = node.args[0] if is_cat and node.args else None
    return isinstance(parts, list | tuple) and all(
        isinstance(p, fx.Node) and _from_layers(gm, p, node) for p in parts
    )


def _reads_metadata(user: fx.Node, of: fx.Node) -> bool:
    """x.shape / x.ndim / x.dtype (getattr), x.size() / x.dim(), aten.sym_size, and the shape
    template of y.reshape_as(x) / y.view_as(x)."""
    if user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"):
        return user.args[0] is not of
    if user.op == "call_method":
        return user.target in ("size", "dim")
    name = _op(getattr(user.target, "__name__", ""))
    return user.op == "call_function" and name in ("getattr", "sym_size", "dim")


def export_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    """The model as an ONNX file, by torch.onnx.export (TorchScript exporter, opset 17)."""
    torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17)
    return path


def run_case(timm: ModuleType, c: Case, onnx_dir: Path | None = None) -> Outcome:
    """Optimize one model (the nn.Module, or its ONNX export when ``onnx_dir`` is given) with
    the default pipeline, without measuring; never raises."""
    start = time.perf_counter()
    model, inputs = build(timm, c)
    outcome = Outcome(c, "onnx" if onnx_dir else "nn.Module", "ok")
    subject: Any = model
    if onnx_dir is not None:
        try:
            subject = export_onnx(model, inputs, onnx_dir / f"{c.name}.onnx")
        except Exception as exc:  # the exporter's failure, not graphopt's
            outcome.status, outcome.reason = "export-failed", _first_line(exc)
            return outcome
    try:
        result = graphopt.optimize(subject, "cpu", example_inputs=inputs, measure=False)
    except InternalError as exc:  # graphopt's wrapper around a raw crash: a bug
        cause = exc.__cause__ or exc
        outcome.status = "failed"
        outcome.reason = f"InternalError: {type(cause).__name__}: {_first_line(cause)}"
    except GraphoptError as exc:
        outcome.status, outcome.reason = "refused", f"{type(exc).__name__}: {_first_line(exc)}"
    except Exception as exc:  # a raw crash: what the suite exists to catch
        outcome.status = "failed"
        outcome.reason = f"{type(exc).__name__}: {_first_line(exc)} @ {_where(exc)}"
    else:
        report = result.report
        outcome.report = report
        outcome.convs = (conv_count(report.ops_before), conv_count(report.ops_after))
        outcome.bns = (bn_count(report.ops_before), bn_count(report.ops_after))
        outcome.conv_bn_left = conv_bn_left(result.graph_module)
        outcome.rolled_back = tuple(r.name for r in report.rolled_back)
        err = report.artifact_error
        outcome.error = "" if err is None else err.describe()
        if err is None or not err.ok:
            outcome.status, outcome.reason = "failed", "no passing end-to-end check"
    outcome.seconds = time.perf_counter() - start
    return outcome


def reparam_check(timm: ModuleType, c: Case, outcome: Outcome) -> dict[str, Any]:
    """timm's own ``reparameterize_model`` on the same model: its deploy model's convs and BNs,
    and its error against the original under the exact contract (as graphopt's is checked)."""
    model, inputs = build(timm, c)
    reference = run_module(model, inputs)
    rounding = Rounding()
    rounding.module, rounding.samples, rounding.reference = model, [inputs], reference
    deploy = timm.utils.model.reparameterize_model(copy.deepcopy(model))
    convs, bns = module_counts(deploy)
    deploy_error = rounding.compare(reference, run_module(deploy, inputs), Numerics.exact())
    return {"timm_convs": convs, "timm_bns": bns, "timm_error": deploy_error}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _where(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"

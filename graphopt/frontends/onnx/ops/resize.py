"""Resize, Upsample and GridSample.

``Resize`` (opsets 10-19) and the deprecated ``Upsample`` map output index ``x`` of each resized
axis to a source coordinate ``x_orig`` (``coordinate_transformation_mode``; ``scale`` is the
given scale, or ``out / in`` when sizes are given) and interpolate there:

    half_pixel          (x + 0.5) / scale - 0.5
    pytorch_half_pixel  the same, 0 when out == 1
    align_corners       x * (in - 1) / (out - 1)
    asymmetric          x / scale
    tf_half_pixel_for_nn (x + 0.5) / scale
    tf_crop_and_resize  roi_start * (in - 1) + x * (roi_end - roi_start) * (in - 1) / (out - 1),
                        extrapolation_value outside [0, in - 1]
    half_pixel_symmetric half_pixel shifted so the output stays centred (floor(in * scale) < in * scale)

Three ways to compute it, the first that applies:

1. ``F.interpolate`` (one op; re-exports as Resize): linear (1-3 spatial dims) and cubic (2-D,
   ``cubic_coeff_a=-0.75``, ``exclude_outside=0``) with half_pixel (torch's
   ``align_corners=False``; pytorch_half_pixel where out == 1 cannot happen) or align_corners;
   nearest with asymmetric/floor where every scale is a power of two (torch multiplies by 1/scale
   where ONNX Runtime divides by scale: the same only when 1/scale is exact).  Only the spatial
   axes (2...) may change; sizes may be runtime shape values (``Shape`` of another tensor);
   float32/float64 only, and given scales only where torch's output size floor(in * scale) is
   ONNX Runtime's int64(float32(scale * in)).  The output shape ONNX shape inference gives
   (floor in float64) is corrected to ONNX Runtime's.
2. nearest, any transformation, any dtype: per axis the source index of every output index,
   then ``index_select``.  With static sizes the index table is ONNX Runtime's own (its Resize
   run once at import on ``arange(in)``: its ties are its own); with runtime sizes (``Shape`` of
   another tensor, or sizes computed by tensor ops) the indices are computed in the graph in
   float32, which reproduces ONNX Runtime for nearest_mode floor/ceil and for align_corners
   (measured for every input length 1..24 and output length 1..48); the round_* modes with
   runtime sizes are refused.
3. linear/cubic with anything else (asymmetric, tf_crop_and_resize, half_pixel_symmetric,
   another ``cubic_coeff_a``, ``exclude_outside``, ``antialias`` when downsampling): static
   sizes only; per axis a constant (out x in) interpolation matrix built like ONNX's reference
   (edge-clamped neighbours, the same coefficients), applied with a matmul.

Refused (the node stays opaque): scales computed at run time, linear/cubic with runtime sizes
outside path 1, nearest round_* modes with runtime sizes, nearest downsampling in Upsample /
Resize-10 (ONNX Runtime's legacy nearest rounds up there), non-float linear/cubic, and
align_corners / tf_crop_and_resize / pytorch_half_pixel with scales whose ``scale * in`` is no
integer (ONNX's reference takes that fractional width, ONNX Runtime the integer size).

``GridSample`` (16: bilinear/nearest/bicubic; 20: linear/nearest/cubic) is ``F.grid_sample`` on
4-D inputs (torch's exporter writes 5-D grid_sample nowhere): every padding mode, both
align_corners.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.backends.onnx_node import NodeSpec, run_onnx_node
from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.ops.resize_math import (
    Kernel,
    interpolation_matrix,
    pick_nearest,
    resize_by_matrix,
    resize_nearest_axis,
    scaled_size,
)
from graphopt.frontends.onnx.values import Value, sym_items

_TRANSFORMS = frozenset(
    [
        "half_pixel",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
        "tf_half_pixel_for_nn",
        "tf_crop_and_resize",
        "half_pixel_symmetric",
    ]
)
_NEAREST_MODES = frozenset(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
_TORCH_LINEAR = {3: "linear", 4: "bilinear", 5: "trilinear"}


@dataclass
class _Resize:
    """One Resize node, its inputs resolved to every axis of the input."""

    mode: str  # nearest | linear | cubic
    transform: str
    nearest_mode: str
    cubic_a: float
    exclude_outside: bool
    antialias: bool
    extrapolation: float
    in_dims: list[int | fx.Node]
    out: list[int | fx.Node]  # output sizes (ints or runtime size nodes)
    scales: list[float] | None  # the given scales (None when sizes are given)
    roi: list[float] | None  # [starts..., ends...] over every axis (tf_crop_and_resize)
    aspect: bool = False  # keep_aspect_ratio_policy: scales hold its scale, out its sizes

    def resized(self) -> list[int]:
        """The axes whose size or coordinates change."""
        axes = []
        for k, (i, o) in enumerate(zip(self.in_dims, self.out, strict=True)):
            same = i is o or (isinstance(i, int) and isinstance(o, int) and i == o)
            scale_one = self.scales is None or self.scales[k] == 1.0
            roi_id = self.roi is None or (self.roi[k] == 0 and self.roi[k + len(self.out)] == 1)
            if not (same and scale_one and (roi_id or self.transform != "tf_crop_and_resize")):
                axes.append(k)
        return axes


# -- parsing -----------------------------------------------------------------------------------


@converter("Resize", "Upsample")
def _resize(ctx: Ctx) -> Value:
    r = _parse(ctx)
    _correct_inferred_shape(ctx, r)
    x = ctx.tensor(0)
    axes = r.resized()
    if not axes:
        return x
    torch_call = _torch_interpolate(ctx, r, axes)
    if torch_call is not None:
        fn, kwargs = torch_call
        return ctx.call(fn, x, **kwargs)
    if r.mode == "nearest":
        return _nearest(ctx, r, x, axes)
    return _by_matrices(ctx, r, x, axes)


def _correct_inferred_shape(ctx: Ctx, r: _Resize) -> None:
    """ONNX shape inference floors scale * in in float64, ONNX Runtime truncates the float32
    product (scale 0.7, in 10: 6 and 7); the output has ONNX Runtime's size."""
    inferred = ctx.imp.shapes.get(ctx.node.output[0])
    if inferred is None or len(inferred) != len(r.out):
        return
    fixed = [o if isinstance(o, int) else d for o, d in zip(r.out, inferred, strict=True)]
    if fixed != inferred:
        ctx.imp.distrust_shapes_after(ctx.node.output[0], fixed)


def _parse(ctx: Ctx) -> _Resize:
    rank = ctx.rank(0)
    in_dims = ctx.dims_of(0)
    if rank is None or in_dims is None:
        raise ctx.fail("the input rank is unknown")
    legacy = ctx.op == "Upsample" or ctx.opset < 11
    mode = str(ctx.attr("mode", "nearest")).lower()
    mode = {"bilinear": "linear", "trilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    if mode not in ("nearest", "linear", "cubic"):
        raise ctx.fail(f"mode={mode!r} is not nearest, linear or cubic")
    if legacy:
        transform, nearest_mode = "asymmetric", "floor"
        scales = _legacy_scales(ctx)
        sizes = None
    else:
        transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = ctx.attr("nearest_mode", "round_prefer_floor")
        scales, sizes = _scales_or_sizes(ctx)
    if transform not in _TRANSFORMS:
        raise ctx.fail(f"coordinate_transformation_mode={transform!r} is not a valid value")
    if nearest_mode not in _NEAREST_MODES:
        raise ctx.fail(f"nearest_mode={nearest_mode!r} is not a valid value")
    axes = [int(a) % rank for a in ctx.attr("axes", range(rank))]
    roi = None
    if transform == "tf_crop_and_resize":
        roi = _full_roi(ctx, axes, rank)
    if scales is not None:
        if len(scales) != len(axes):
            raise ctx.fail(f"scales {scales} do not have one entry per axis {axes}")
        full = [1.0] * rank
        for a, s in zip(axes, scales, strict=True):
            full[a] = s
        scales = full
        if legacy and mode == "nearest" and any(s < 1 for s in scales):
            raise ctx.fail(
                f"nearest downsampling (scales {scales}) in {ctx.op}-{ctx.opset} is not "
                "supported (ONNX Runtime's legacy nearest rounds up there)"
            )
        out = [_scaled_dim(d, s) for d, s in zip(in_dims, scales, strict=True)]
        _check_fractional_width(ctx, transform, in_dims, scales)
    else:
        out = list(in_dims)
        policy_sizes, policy_scale = _aspect(ctx, sizes, axes, in_dims)
        for a, s in zip(axes, policy_sizes, strict=True):
            out[a] = s
        if policy_scale is not None:  # the coordinates use the policy's scale
            scales = [policy_scale if a in axes else 1.0 for a in range(rank)]
    return _Resize(
        mode=mode,
        transform=transform,
        nearest_mode=nearest_mode,
        cubic_a=float(ctx.attr("cubic_coeff_a", -0.75)),
        exclude_outside=bool(ctx.attr("exclude_outside", 0)),
        antialias=bool(ctx.attr("antialias", 0)),
        extrapolation=float(ctx.attr("extrapolation_value", 0.0)),
        in_dims=in_dims,
        out=out,
        scales=scales,
        roi=roi,
        aspect=sizes is not None and scales is not None,
    )


def _legacy_scales(ctx: Ctx) -> list[float]:
    if "scales" in ctx.attrs:
        return [float(s) for s in ctx.attr("scales")]
    return _const_floats(ctx, 1, "scales")


def _const_floats(ctx: Ctx, i: int, what: str) -> list[float]:
    v = ctx.value(i)
    if not isinstance(v, torch.Tensor):
        raise ctx.fail(
            f"input {what!r} ({ctx.node.input[i]!r}) is computed at run time",
            "Export the model with constant scales, or with sizes.",
        )
    return [float(s) for s in v.reshape(-1).tolist()]


def _scales_or_sizes(ctx: Ctx) -> tuple[list[float] | None, list[Any] | None]:
    scales = ctx.value(2)
    if isinstance(scales, torch.Tensor) and scales.numel() == 0:
        scales = None
    if scales is not None:
        return _const_floats(ctx, 2, "scales"), None
    sizes = ctx.value(3)
    items = sym_items(sizes)
    if sizes is None:
        raise ctx.fail("neither scales nor sizes is given")
    if items is None and ctx.static_dim(3, 0) is not None:
        # computed by tensor ops (torch's recompute_scale_factor: Floor(Cast(Shape) * scale)):
        # each size a 0-D tensor at run time; only the nearest path reads such sizes
        items = [ctx.call(operator.getitem, sizes, k) for k in range(ctx.static_dim(3, 0))]
    if items is None:
        raise ctx.fail(
            f"input 'sizes' ({ctx.node.input[3]!r}) is computed at run time and its length is "
            "unknown",
            "Export the model with constant sizes or sizes taken from Shape.",
        )
    return None, items


def _full_roi(ctx: Ctx, axes: list[int], rank: int) -> list[float]:
    roi = _const_floats(ctx, 1, "roi") if ctx.has(1) else []
    if len(roi) != 2 * len(axes):
        raise ctx.fail(f"roi {roi} does not have 2 x {len(axes)} entries")
    full = [0.0] * rank + [1.0] * rank
    for k, a in enumerate(axes):
        full[a], full[a + rank] = roi[k], roi[k + len(axes)]
    return full


def _check_fractional_width(
    ctx: Ctx, transform: str, in_dims: list[Any], scales: list[float]
) -> None:
    """align_corners, tf_crop_and_resize and pytorch_half_pixel read the output width: ONNX's
    reference takes scale * in, ONNX Runtime the integer output size. Where they differ, the
    node stays opaque (ONNX Runtime's answer, which optimize() verifies against)."""
    if transform not in ("align_corners", "tf_crop_and_resize", "pytorch_half_pixel"):
        return
    for d, s in zip(in_dims, scales, strict=True):
        if not _integral(d, s):
            raise ctx.fail(
                f"coordinate_transformation_mode={transform!r} with scale {s} and an input "
                f"size {d if isinstance(d, int) else '(known at run time)'} whose product is "
                "no integer is not supported (ONNX's reference and ONNX Runtime disagree)",
                "Give sizes instead of scales.",
            )


def _integral(d: Any, s: float) -> bool:
    """Whether float32(s) * d is an integer (d a static size; else s must be one)."""
    if isinstance(d, int):
        width = np.float32(s) * np.float32(d)
        return width == int(width)
    return s == int(s)


def _scaled_dim(d: int | fx.Node, s: float) -> int | fx.Node | None:
    # ONNX Runtime: int64(float(scale) * in), a float32 product
    if isinstance(d, int):
        return int(np.float32(s) * np.float32(d))
    return d if s == 1.0 else None


def _aspect(
    ctx: Ctx, sizes: list[Any], axes: list[int], in_dims: list[Any]
) -> tuple[list[Any], float | None]:
    """The output sizes of ``axes`` under keep_aspect_ratio_policy (opset 18) and the policy's
    scale (None: stretch), in float32 as ONNX Runtime computes them."""
    if len(sizes) != len(axes):
        raise ctx.fail(f"sizes have {len(sizes)} entries for axes {axes}")
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
    if policy == "stretch":
        return sizes, None
    if policy not in ("not_larger", "not_smaller"):
        raise ctx.fail(f"keep_aspect_ratio_policy={policy!r} is not a valid value")
    dims = [in_dims[a] for a in axes]
    if not all(isinstance(v, int) for v in sizes + dims):
        raise ctx.fail(f"keep_aspect_ratio_policy={policy!r} with runtime sizes is not supported")
    ratios = [np.float32(s) / np.float32(d) for s, d in zip(sizes, dims, strict=True)]
    scale = min(ratios) if policy == "not_larger" else max(ratios)
    # std::round: half away from zero
    return [int(math.floor(float(scale * np.float32(d)) + 0.5)) for d in dims], float(scale)


# -- path 1: F.interpolate -----------------------------------------------------------------


def _torch_interpolate(ctx: Ctx, r: _Resize, axes: list[int]) -> tuple[Any, dict[str, Any]] | None:
    """F.interpolate and its arguments, where it computes exactly what the node does."""
    rank = len(r.in_dims)
    # float16/bfloat16: torch interpolates in that precision; the matrices round once
    if r.aspect or min(axes) < 2 or ctx.dtype(0) not in (torch.float32, torch.float64, None):
        return None
    if any(o is None for o in r.out) and r.scales is None:
        return None
    kwargs: dict[str, Any] = {}
    if r.mode == "nearest":
        if (r.transform, r.nearest_mode) != ("asymmetric", "floor") or rank not in (3, 4, 5):
            return None
        ratios = r.scales[2:] if r.scales is not None else _static_ratios(r)
        if ratios is None or not all(_power_of_two(s) for s in ratios):
            return None
        kwargs["mode"] = "nearest"
    else:
        if r.mode == "cubic" and (rank != 4 or r.cubic_a != -0.75 or r.exclude_outside):
            return None
        if rank not in _TORCH_LINEAR or not _torch_coordinates(r, axes):
            return None
        kwargs["mode"] = "bicubic" if r.mode == "cubic" else _TORCH_LINEAR[rank]
        kwargs["align_corners"] = r.transform == "align_corners"
    if r.scales is not None:
        if not all(_same_size(d, s) for d, s in zip(r.in_dims[2:], r.scales[2:], strict=True)):
            return None
        kwargs["scale_factor"] = tuple(r.scales[2:])
    else:
        kwargs["size"] = list(r.out[2:])
    return F.interpolate, kwargs


def _same_size(d: Any, s: float) -> bool:
    """Whether torch's output size floor(double(in) * s) is ONNX Runtime's int64(float32(s) *
    in) (scale 0.7, in 10: torch 6, ONNX Runtime 7); for a runtime size only where s is an
    integer or a power of two (exact products)."""
    if isinstance(d, int):
        return math.floor(d * float(np.float32(s))) == int(np.float32(s) * np.float32(d))
    return s == int(s) or _power_of_two(s)


def _static_ratios(r: _Resize) -> list[float] | None:
    dims = list(zip(r.in_dims[2:], r.out[2:], strict=True))
    if not all(isinstance(i, int) and isinstance(o, int) for i, o in dims):
        return None
    return [o / i for i, o in dims]


def _power_of_two(s: float) -> bool:
    if s <= 0:
        return False
    m, _ = math.frexp(s)
    return m == 0.5


def _downsamples(r: _Resize, k: int) -> bool | None:
    if r.scales is not None:
        return r.scales[k] < 1
    i, o = r.in_dims[k], r.out[k]
    return o < i if isinstance(i, int) and isinstance(o, int) else None


def _torch_coordinates(r: _Resize, axes: list[int]) -> bool:
    """Whether torch's align_corners=False/True maps coordinates as r.transform does."""
    if r.antialias and any(_downsamples(r, k) is not False for k in axes):
        return False  # antialias changes the kernel when downsampling (or maybe)
    if r.transform == "half_pixel":
        return True
    if r.transform == "align_corners":  # scale * in == out (checked at parsing)
        return True
    if r.transform != "pytorch_half_pixel":
        return False
    # differs from half_pixel only where out == 1 and in > 1, i.e. when downsampling
    return all(
        _downsamples(r, k) is False or (isinstance(r.out[k], int) and r.out[k] > 1) for k in axes
    )


# -- path 2: nearest by source indices ----------------------------------------------------


def _nearest(ctx: Ctx, r: _Resize, x: Any, axes: list[int]) -> Any:
    for k in axes:
        i, out = r.in_dims[k], r.out[k]
        roi = None if r.roi is None else (r.roi[k], r.roi[k + len(r.out)])
        scale = None if r.scales is None else float(np.float32(r.scales[k]))
        if isinstance(i, int) and isinstance(out, int) and not r.aspect:
            picked = _ort_nearest_indices(r, i, out, scale, roi)
            x = ctx.call(pick_nearest, x, k, torch.from_numpy(picked), r.extrapolation)
            continue
        if not _formula_is_ort(r):
            raise ctx.fail(
                f"nearest_mode={r.nearest_mode!r} with coordinate_transformation_mode="
                f"{r.transform!r} and sizes known only at run time"
                + (" or keep_aspect_ratio_policy" if r.aspect else "")
                + " is not supported (ONNX "
                "Runtime's rounding of ties is reproduced only for floor/ceil, or align_corners)",
                "Export the model with static sizes, or nearest_mode=floor.",
            )
        if out is None:  # scales with a runtime input size: ONNX Runtime's float32 product
            out = ctx.call(scaled_size, i, scale)
        x = ctx.call(
            resize_nearest_axis, x, k, out, scale, r.transform, r.nearest_mode, roi, r.extrapolation
        )
    return x


def _formula_is_ort(r: _Resize) -> bool:
    """Whether resize_nearest_axis picks what ONNX Runtime picks for every size: measured for
    inputs 1..24 to outputs 1..48 (tests/frontends/test_onnx_resize.py); ties of the round_*
    modes and half_pixel_symmetric come out differently in ONNX Runtime's arithmetic."""
    if r.transform in ("half_pixel_symmetric", "tf_crop_and_resize"):
        return False
    return r.nearest_mode in ("floor", "ceil") or r.transform == "align_corners"


def _ort_nearest_indices(
    r: _Resize, n_in: int, n_out: int, scale: float | None, roi: tuple[float, float] | None
) -> np.ndarray:
    """The source index of every output index (-1: extrapolated), as ONNX Runtime picks them:
    its own Resize run on arange(n_in) with the node's attributes (its ties are its own)."""
    names = ["x", "roi" if roi is not None else "", "scales" if scale is not None else ""]
    inputs = [torch.arange(n_in, dtype=torch.float32)]
    if roi is not None:
        inputs.append(torch.tensor(roi, dtype=torch.float32))
    if scale is not None:
        inputs.append(torch.tensor([scale], dtype=torch.float32))
    else:
        names.append("sizes")
        inputs.append(torch.tensor([n_out], dtype=torch.int64))
    node = onnx.helper.make_node(
        "Resize",
        names,
        ["y"],
        mode="nearest",
        coordinate_transformation_mode=r.transform,
        nearest_mode=r.nearest_mode,
        extrapolation_value=-1.0,
    )
    spec = NodeSpec(
        node=node.SerializeToString(),
        inputs=tuple(n for n in names if n),
        opsets=(("", 19),),
        ir_version=9,
    )
    picked = run_onnx_node(spec, *inputs)
    return picked.numpy().astype(np.int64)


# -- path 3: interpolation matrices --------------------------------------------------------


def _by_matrices(ctx: Ctx, r: _Resize, x: Any, axes: list[int]) -> Any:
    if not (ctx.dtype(0) or torch.float32).is_floating_point:
        raise ctx.fail(f"{r.mode} mode on {ctx.dtype(0)} input is not supported")
    for k in axes:
        i, o = r.in_dims[k], r.out[k]
        if not isinstance(i, int) or not isinstance(o, int):
            raise ctx.fail(
                f"{r.mode} mode with coordinate_transformation_mode={r.transform!r}"
                + (f", cubic_coeff_a={r.cubic_a}" if r.mode == "cubic" else "")
                + f", exclude_outside={int(r.exclude_outside)}, antialias={int(r.antialias)}"
                " needs static input and output sizes (it is no F.interpolate mode)",
                "Export the model with static spatial sizes.",
            )
    for k in axes:
        i, o = r.in_dims[k], r.out[k]
        scale = r.scales[k] if r.scales is not None else o / i
        roi = None if r.roi is None else (r.roi[k], r.roi[k + len(r.out)])
        kernel = Kernel(r.mode, r.transform, r.cubic_a, r.exclude_outside, r.antialias)
        scale = float(np.float32(scale)) if r.scales is not None else scale
        m, outside = interpolation_matrix(kernel, i, o, scale, roi)
        m_t = torch.from_numpy(m.T.copy()).to(torch.float32)
        mask = torch.from_numpy(outside) if outside.any() else None
        x = ctx.call(resize_by_matrix, x, k, m_t, mask, r.extrapolation)
    return x


# -- GridSample ------------------------------------------------------------------------------

_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest"}
_GRID_MODES |= {"bicubic": "bicubic", "cubic": "bicubic"}


@converter("GridSample")
def _grid_sample(ctx: Ctx) -> Value:
    mode = ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear")
    padding = ctx.attr("padding_mode", "zeros")
    if mode not in _GRID_MODES:
        raise ctx.fail(f"mode={mode!r} is not a valid value")
    if padding not in ("zeros", "border", "reflection"):
        raise ctx.fail(f"padding_mode={padding!r} is not a valid value")
    rank = ctx.rank(0)
    if rank != 4:  # torch's TorchScript exporter writes no 5-D (volumetric) grid_sample
        raise ctx.fail(f"a {rank}-D input (only 4-D: N, C, H, W) is not supported")
    if ctx.dtype(0) not in (torch.float32, torch.float64) or ctx.dtype(1) != ctx.dtype(0):
        raise ctx.fail(f"input dtypes {ctx.dtype(0)} / {ctx.dtype(1)} are not float32/float64")
    return ctx.call(
        F.grid_sample,
        ctx.tensor(0),
        ctx.tensor(1),
        mode=_GRID_MODES[mode],
        padding_mode=padding,
        align_corners=bool(ctx.attr("align_corners", 0)),
    )

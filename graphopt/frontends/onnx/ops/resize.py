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
   axes (2...) may change; sizes may be runtime shape values (``Shape`` of another tensor).
2. nearest, any transformation, any dtype: per axis, the source indices computed as ONNX Runtime
   computes them (float32 arithmetic), then ``index_select``; works for runtime sizes too.
3. linear/cubic with anything else (asymmetric, tf_crop_and_resize, half_pixel_symmetric,
   another ``cubic_coeff_a``, ``exclude_outside``, ``antialias`` when downsampling): static
   sizes only; per axis a constant (out x in) interpolation matrix built like ONNX's reference
   (edge-clamped neighbours, the same coefficients), applied with a matmul.

Refused (the node stays opaque): scales computed at run time, linear/cubic with runtime sizes
outside path 1, nearest downsampling in Upsample / Resize-10 (ONNX Runtime's legacy nearest
rounds up there), non-float linear/cubic.

``GridSample`` (16: bilinear/nearest/bicubic; 20: linear/nearest/cubic) is ``F.grid_sample`` on
4-D inputs (torch's exporter writes 5-D grid_sample nowhere): every padding mode, both
align_corners.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.registry import converter
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

    def scale(self, k: int) -> float | None:
        """The scale ONNX Runtime maps coordinates of axis k with (float32), if static."""
        if self.scales is not None:
            return float(np.float32(self.scales[k]))
        i, o = self.in_dims[k], self.out[k]
        if isinstance(i, int) and isinstance(o, int):
            return float(np.float32(o) / np.float32(i))
        return None


# -- parsing -----------------------------------------------------------------------------------


@converter("Resize", "Upsample")
def _resize(ctx: Ctx) -> Value:
    r = _parse(ctx)
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
        for a, s in zip(axes, _aspect(ctx, sizes, axes, in_dims), strict=True):
            out[a] = s
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
    if items is None:
        raise ctx.fail(
            f"input 'sizes' ({ctx.node.input[3]!r}) is computed at run time from values the "
            "importer does not track",
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


def _aspect(ctx: Ctx, sizes: list[Any], axes: list[int], in_dims: list[Any]) -> list[Any]:
    """The output sizes of ``axes`` under keep_aspect_ratio_policy (opset 18)."""
    if len(sizes) != len(axes):
        raise ctx.fail(f"sizes have {len(sizes)} entries for axes {axes}")
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
    if policy == "stretch":
        return sizes
    if policy not in ("not_larger", "not_smaller"):
        raise ctx.fail(f"keep_aspect_ratio_policy={policy!r} is not a valid value")
    dims = [in_dims[a] for a in axes]
    if not all(isinstance(v, int) for v in sizes + dims):
        raise ctx.fail(f"keep_aspect_ratio_policy={policy!r} with runtime sizes is not supported")
    ratios = [s / d for s, d in zip(sizes, dims, strict=True)]
    scale = min(ratios) if policy == "not_larger" else max(ratios)
    return [int(scale * d + 0.5) for d in dims]


# -- path 1: F.interpolate -----------------------------------------------------------------


def _torch_interpolate(ctx: Ctx, r: _Resize, axes: list[int]) -> tuple[Any, dict[str, Any]] | None:
    """F.interpolate and its arguments, where it computes exactly what the node does."""
    rank = len(r.in_dims)
    if min(axes) < 2 or not (ctx.dtype(0) or torch.float32).is_floating_point:
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
        kwargs["scale_factor"] = tuple(r.scales[2:])
    else:
        kwargs["size"] = list(r.out[2:])
    return F.interpolate, kwargs


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
        out = r.out[k]
        if out is None:  # scales with a runtime input size: ONNX Runtime's float32 product
            out = ctx.call(scaled_size, r.in_dims[k], float(np.float32(r.scales[k])))
        roi = None if r.roi is None else (r.roi[k], r.roi[k + len(r.out)])
        scale = None if r.scales is None else float(np.float32(r.scales[k]))
        x = ctx.call(
            resize_nearest_axis,
            x,
            k,
            out,
            scale,
            r.transform,
            r.nearest_mode,
            roi,
            r.extrapolation,
        )
    return x


def scaled_size(size: Any, scale: float) -> Any:
    """ONNX Runtime's output size for a scale: int64(float32(scale) * in) (traces dynamically)."""
    if isinstance(size, int):
        return int(np.float32(scale) * np.float32(size))
    return torch.floor(torch.as_tensor(size, dtype=torch.float32) * scale).to(torch.int64)


def _source_coordinates(
    out: Any, size: Any, scale: Any, transform: str, roi: tuple[float, float] | None
) -> torch.Tensor:
    """x_orig for every output index, in float32 as ONNX Runtime computes it."""
    f32 = torch.float32
    x = torch.arange(out, dtype=torch.int64).to(f32)
    n_in = torch.as_tensor(size, dtype=f32)
    n_out = torch.as_tensor(out, dtype=f32)
    if scale is None:
        scale = n_out / n_in
    if transform in ("half_pixel", "pytorch_half_pixel"):
        xo = (x + 0.5) / scale - 0.5
        if transform == "pytorch_half_pixel":
            xo = torch.where(n_out > 1, xo, torch.zeros_like(xo))
        return xo
    if transform == "asymmetric":
        return x / scale
    if transform == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if transform == "align_corners":
        return torch.where(n_out > 1, x * (n_in - 1) / torch.clamp(n_out - 1, min=1), x * 0)
    if transform == "half_pixel_symmetric":
        adjustment = torch.as_tensor(out, dtype=f32) / (scale * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    start, end = roi  # tf_crop_and_resize
    many = start * (n_in - 1) + x * (end - start) * (n_in - 1) / torch.clamp(n_out - 1, min=1)
    return torch.where(n_out > 1, many, 0.5 * (start + end) * (n_in - 1) + x * 0)


def resize_nearest_axis(
    x: torch.Tensor,
    axis: int,
    out: Any,
    scale: float | None,
    transform: str,
    nearest_mode: str,
    roi: tuple[float, float] | None,
    extrapolation: float,
) -> torch.Tensor:
    """ONNX Resize (nearest) along one axis: the source index of each output index, picked."""
    size = x.shape[axis]
    xo = _source_coordinates(out, size, scale, transform, roi)
    if nearest_mode == "floor":
        idx = torch.floor(xo)
    elif nearest_mode == "ceil":
        idx = torch.ceil(xo)
    elif nearest_mode == "round_prefer_ceil":
        idx = torch.floor(xo + 0.5)
    else:  # round_prefer_floor
        idx = torch.ceil(xo - 0.5)
    last = torch.as_tensor(size, dtype=torch.int64) - 1
    idx = torch.minimum(torch.clamp(idx.to(torch.int64), min=0), last)
    y = torch.index_select(x, axis, idx)
    if transform != "tf_crop_and_resize":
        return y
    outside = (xo < 0) | (xo > last.to(torch.float32))
    shape = [1] * x.dim()
    shape[axis] = -1
    fill = torch.tensor(extrapolation, dtype=x.dtype)
    return torch.where(outside.reshape(shape), fill, y)


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
        m, outside = interpolation_matrix(r, i, o, scale, roi)
        m_t = torch.from_numpy(m.T.copy()).to(torch.float32)
        mask = torch.from_numpy(outside) if outside.any() else None
        x = ctx.call(resize_by_matrix, x, k, m_t, mask, r.extrapolation)
    return x


def _coefficients(r: _Resize, ratio: np.ndarray, scale: float) -> np.ndarray:
    """(out, taps) weights of the neighbours, as ONNX's reference computes them."""
    a = r.cubic_a
    if r.mode == "linear" and not (r.antialias and scale < 1):
        return np.stack([1 - ratio, ratio], axis=1)
    if r.mode == "cubic" and not (r.antialias and scale < 1):
        t = [ratio + 1, ratio, 1 - ratio, 2 - ratio]
        near = [((a + 2) * d - (a + 3)) * d * d + 1 for d in t[1:3]]
        far = [((a * d - 5 * a) * d + 8 * a) * d - 4 * a for d in (t[0], t[3])]
        return np.stack([far[0], near[0], near[1], far[1]], axis=1)
    # antialias when downsampling: the kernel stretched by 1 / scale, normalized
    start = int(np.floor((-1 if r.mode == "linear" else -2) / scale) + 1)
    taps = np.arange(start, 2 - start)
    d = np.abs((taps[None, :] - ratio[:, None]) * scale)
    if r.mode == "linear":
        w = np.clip(1 - d, 0, 1)
    else:
        w = np.where(
            d <= 1,
            (a + 2) * d**3 - (a + 3) * d**2 + 1,
            np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0),
        )
    return w / w.sum(axis=1, keepdims=True)


def _reference_coordinates(
    transform: str, n_in: int, n_out: int, scale: float, roi: tuple[float, float] | None
) -> np.ndarray:
    y = np.arange(n_out, dtype=np.float64)
    width = scale * n_in
    if transform == "align_corners":
        return np.zeros(n_out) if width == 1 else y * (n_in - 1) / (width - 1)
    if transform == "asymmetric":
        return y / scale
    if transform == "tf_crop_and_resize":
        start, end = roi
        if width == 1:
            return np.full(n_out, (end - start) * (n_in - 1) / 2 + start * (n_in - 1))
        return y * (end - start) * (n_in - 1) / (width - 1) + start * (n_in - 1)
    if transform == "pytorch_half_pixel" and width == 1:
        return np.full(n_out, -0.5)
    if transform == "half_pixel_symmetric":
        offset = n_in / 2 * (1 - n_out / width)
        return offset + (y + 0.5) / scale - 0.5
    if transform == "tf_half_pixel_for_nn":
        return (y + 0.5) / scale
    return (y + 0.5) / scale - 0.5


def interpolation_matrix(
    r: _Resize, n_in: int, n_out: int, scale: float, roi: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The (out, in) matrix of a linear/cubic resize of one axis and its extrapolated rows."""
    scale = float(np.float32(scale)) if r.scales is not None else scale
    xo = _reference_coordinates(r.transform, n_in, n_out, scale, roi)
    base = np.floor(xo)
    ratio = np.where(xo == base, 1.0, xo - base)
    coeffs = _coefficients(r, ratio, scale)
    n = coeffs.shape[1]
    # the n nearest indices of xo in the edge-padded input, ties to the smaller
    pad = int(np.ceil(n / 2))
    padded = xo + pad
    p = np.floor(padded).astype(np.int64)
    frac = padded - p
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    idx = (p + offset)[:, None] + np.arange(n)[None, :] - pad
    if r.exclude_outside:
        coeffs = np.where((idx < 0) | (idx >= n_in), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    m = np.zeros((n_out, n_in))
    rows = np.repeat(np.arange(n_out), n)
    np.add.at(m, (rows, np.clip(idx, 0, n_in - 1).reshape(-1)), coeffs.reshape(-1))
    outside = np.zeros(n_out, dtype=bool)
    if r.transform == "tf_crop_and_resize":
        outside = (xo < 0) | (xo > n_in - 1)
    return m, outside


def resize_by_matrix(
    x: torch.Tensor,
    axis: int,
    m_t: torch.Tensor,
    outside: torch.Tensor | None,
    extrapolation: float,
) -> torch.Tensor:
    """``x`` resized along ``axis`` by an (in, out) interpolation matrix (float32 math)."""
    y = torch.matmul(torch.movedim(x, axis, -1).to(torch.float32), m_t)
    y = torch.movedim(y, -1, axis)
    if outside is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        y = torch.where(outside.reshape(shape), torch.tensor(extrapolation, dtype=y.dtype), y)
    return y.to(x.dtype)

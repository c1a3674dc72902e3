"""The arithmetic of ONNX Resize (see :mod:`.resize`): source indices for nearest, per-axis
interpolation matrices for linear/cubic, and the functions the imported graph calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Kernel:
    """A linear/cubic Resize's interpolation, as its attributes give it."""

    mode: str  # linear | cubic
    transform: str
    cubic_a: float = -0.75
    exclude_outside: bool = False
    antialias: bool = False


# -- nearest ---------------------------------------------------------------------------------


def pick_nearest(
    x: torch.Tensor, axis: int, picked: torch.Tensor, extrapolation: float
) -> torch.Tensor:
    """``x`` resized along ``axis`` by source indices (-1: the extrapolation value)."""
    y = torch.index_select(x, axis, torch.clamp(picked, min=0))
    if not bool((picked < 0).any()):
        return y
    shape = [1] * x.dim()
    shape[axis] = -1
    fill = torch.tensor(extrapolation, dtype=x.dtype)
    return torch.where((picked < 0).reshape(shape), fill, y)


def scaled_size(size: Any, scale: float) -> Any:
    """ONNX Runtime's output size for a scale: int64(float32(scale) * in) (traces dynamically)."""
    if isinstance(size, int):
        return int(np.float32(scale) * np.float32(size))
    return torch.floor(torch.as_tensor(size, dtype=torch.float32) * scale).to(torch.int64)


def _source_coordinates(
    out: Any, size: Any, scale: Any, transform: str, roi: tuple[float, float] | None
) -> torch.Tensor:
    """x_orig for every output index, as ONNX Runtime computes it; with sizes equal to the
    input's (scale 1) ONNX Runtime copies the axis, whatever the transformation."""
    xo = _transformed(out, size, scale, transform, roi)
    if scale is not None or transform == "tf_crop_and_resize":
        return xo
    same = torch.as_tensor(out) == torch.as_tensor(size)
    return torch.where(same, torch.arange(out, dtype=torch.int64).to(xo.dtype), xo)


def _transformed(
    out: Any, size: Any, scale: Any, transform: str, roi: tuple[float, float] | None
) -> torch.Tensor:
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


# -- linear and cubic: interpolation matrices ------------------------------------------------


def _coefficients(k: Kernel, ratio: np.ndarray, scale: float) -> np.ndarray:
    """(out, taps) weights of the neighbours, as ONNX's reference computes them."""
    a = k.cubic_a
    if k.mode == "linear" and not (k.antialias and scale < 1):
        return np.stack([1 - ratio, ratio], axis=1)
    if k.mode == "cubic" and not (k.antialias and scale < 1):
        t = [ratio + 1, ratio, 1 - ratio, 2 - ratio]
        near = [((a + 2) * d - (a + 3)) * d * d + 1 for d in t[1:3]]
        far = [((a * d - 5 * a) * d + 8 * a) * d - 4 * a for d in (t[0], t[3])]
        return np.stack([far[0], near[0], near[1], far[1]], axis=1)
    # antialias when downsampling: the kernel stretched by 1 / scale, normalized
    start = int(np.floor((-1 if k.mode == "linear" else -2) / scale) + 1)
    taps = np.arange(start, 2 - start)
    d = np.abs((taps[None, :] - ratio[:, None]) * scale)
    if k.mode == "linear":
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
    k: Kernel, n_in: int, n_out: int, scale: float, roi: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The (out, in) matrix of a linear/cubic resize of one axis and its extrapolated rows
    (``scale``: the given scale, or out / in for sizes)."""
    xo = _reference_coordinates(k.transform, n_in, n_out, scale, roi)
    base = np.floor(xo)
    ratio = np.where(xo == base, 1.0, xo - base)
    coeffs = _coefficients(k, ratio, scale)
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
    if k.exclude_outside:
        coeffs = np.where((idx < 0) | (idx >= n_in), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    m = np.zeros((n_out, n_in))
    rows = np.repeat(np.arange(n_out), n)
    np.add.at(m, (rows, np.clip(idx, 0, n_in - 1).reshape(-1)), coeffs.reshape(-1))
    outside = np.zeros(n_out, dtype=bool)
    if k.transform == "tf_crop_and_resize":
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

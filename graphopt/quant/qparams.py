"""Quantisation parameters: the scale and zero point of an int8 / uint8 / int32 tensor.

Quantisation is ``q = clamp(round(x / s) + z, q_min, q_max)`` and ``x ~ s * (q - z)``:

    symmetric int8 (activations, per tensor):   s = t / 127,  z = 0,    q in [-127, 127]
    asymmetric uint8 (activations):             s = (hi - lo) / 255,
                                                z = clamp(round(-lo / s), 0, 255), lo <= 0 <= hi
    weights (symmetric int8, per channel c):    s[c] = max|W[c, ...]| / 127   (axis 0 for Conv)
    bias (int32):                               s_b = s_x * s_w  (per channel), z = 0

How the threshold ``t`` (or the range ``lo, hi``) of an activation is chosen is the observers'
business (:mod:`graphopt.quant.observers`). A tensor that is not a finite, non-empty
floating-point tensor raises :class:`~graphopt.errors.InputError` (:func:`checked_tensor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphopt.errors import GraphoptError, InputError

__all__ = [
    "INT8",
    "INT32",
    "UINT8",
    "QParams",
    "asymmetric_qparams",
    "bias_qparams",
    "checked_extrema",
    "checked_tensor",
    "quantize_bias",
    "symmetric_qparams",
    "check_weight_bits",
    "weight_qparams",
]

INT8 = (-127, 127)  # symmetric: -128 is left out so that the range is symmetric (ORT, TensorRT)
UINT8 = (0, 255)
INT32 = (-(2**31), 2**31 - 1)


# ------------------------------------------------------------------------------------------------
# quantisation parameters


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of a quantised tensor, per tensor (``axis`` None) or per channel.

    ``scale`` is float32 (what an ONNX ``QuantizeLinear`` stores), ``zero_point`` int64;
    both 0-d per tensor, 1-d along ``axis`` per channel. ``dtype`` names the integer type.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    dtype: str = "int8"
    axis: int | None = None
    method: str = ""

    @property
    def symmetric(self) -> bool:
        return bool((self.zero_point == 0).all()) and self.qmin == -self.qmax

    def _shaped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.scale.double(), self.zero_point.double()
        if self.axis is None:
            return s, z
        axis = self.axis % x.dim()
        if x.shape[axis] != s.numel():
            raise InputError(
                f"per-channel parameters have {s.numel()} channels but the tensor has "
                f"{x.shape[axis]} along axis {self.axis} (shape {tuple(x.shape)}); quantise the "
                "tensor the parameters were computed for."
            )
        shape = [1] * x.dim()
        shape[axis] = -1
        return s.reshape(shape), z.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer values (int64) of ``x``: ``clamp(round(x / s) + z, qmin, qmax)``."""
        s, z = self._shaped(x)
        return torch.clamp(torch.round(x.double() / s) + z, self.qmin, self.qmax).long()

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """``s * (q - z)`` in float32."""
        s, z = self._shaped(q)
        return ((q.double() - z) * s).float()

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantised and dequantised, in ``x``'s dtype (error <= s/2 inside the range)."""
        s, z = self._shaped(x)
        q = torch.clamp(torch.round(x.double() / s) + z, self.qmin, self.qmax)
        return ((q - z) * s).to(x.dtype)

    def squared_error(self, x: torch.Tensor) -> float:
        """``sum((fake_quantize(x) - x)^2)`` of a per-tensor ``x``, computed as ONNX Runtime's
        QuantizeLinear does (float32 ``x / s``, rounded half to even) in one float32 buffer,
        summed in float64. Per-channel parameters take the float64 route."""
        if self.axis is not None or x.dtype != torch.float32:
            return float(((self.fake_quantize(x.double()) - x.double()) ** 2).sum())
        s, z = float(self.scale.reshape(-1)[0]), float(self.zero_point.reshape(-1)[0])
        y = x.detach() / torch.tensor(s, dtype=torch.float32)
        torch.round(y, out=y)
        y.add_(z).clamp_(self.qmin, self.qmax).sub_(z).mul_(s).sub_(x)
        return float(y.reshape(-1).square_().sum(dtype=torch.float64))

    def __str__(self) -> str:
        if self.axis is None:
            return f"{self.dtype} scale={self.scale.item():.6g} zp={int(self.zero_point)}" + (
                f" ({self.method})" if self.method else ""
            )
        return (
            f"{self.dtype} per-channel(axis={self.axis}) scale in "
            f"[{self.scale.min().item():.6g}, {self.scale.max().item():.6g}]"
        )


def _scale_tensor(values: Any) -> torch.Tensor:
    """Scales as float32, a zero scale (a constant-zero tensor) replaced by 1: every value
    then quantises to 0 exactly, and ``QuantizeLinear`` never divides by zero."""
    s = torch.as_tensor(values, dtype=torch.float64)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s.float()


def symmetric_qparams(threshold: float, method: str = "") -> QParams:
    """Per-tensor symmetric int8: ``s = t / 127``, ``z = 0``."""
    return QParams(
        _scale_tensor(threshold / INT8[1]),
        torch.zeros((), dtype=torch.int64),
        *INT8,
        dtype="int8",
        method=method,
    )


def asymmetric_qparams(lo: float, hi: float, method: str = "") -> QParams:
    """Per-tensor asymmetric uint8 over ``[min(lo, 0), max(hi, 0)]`` (0 exactly representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = UINT8
    scale = _scale_tensor((hi - lo) / (qmax - qmin))
    zp = min(max(round(qmin - lo / scale.item()), qmin), qmax)
    return QParams(scale, torch.tensor(zp, dtype=torch.int64), qmin, qmax, "uint8", method=method)


def check_weight_bits(bits: int) -> None:
    """InputError unless ``bits`` is 8 or 7 (the weights int8 QDQ models hold)."""
    if bits not in (7, 8):
        raise InputError(f"weights are quantised to 8 or 7 bits; got weight_bits={bits}.")


def weight_qparams(weight: torch.Tensor, axis: int = 0, bits: int = 8) -> QParams:
    """Symmetric per-channel int8 parameters of a weight: ``s[c] = max|W[c]| / 127``.

    ``axis`` is the output-channel axis: 0 for Conv (``[C_out, C_in/g, k..]``) and Linear
    (``[out, in]``), 1 for ConvTranspose and for a MatMul weight ``B[K, N]``. ``bits=7``:
    int8 values in ``[-63, 63]`` (``s[c] = max|W[c]| / 63``), whose pairs of products with
    uint8 activations never leave int16 (x86 int8 kernels without VNNI add them there).
    """
    check_weight_bits(bits)
    w = checked_tensor(weight, "weight")
    if w.dim() == 0:
        raise InputError("a per-channel weight needs at least one dimension; got a scalar.")
    if not -w.dim() <= axis < w.dim():
        raise InputError(
            f"axis {axis} is out of range for a weight of shape {tuple(w.shape)}; use the "
            "output-channel axis (0 for Conv/Linear, 1 for ConvTranspose or MatMul B[K, N])."
        )
    axis %= w.dim()
    amax = w.detach().double().abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(1)
    bound = 2 ** (bits - 1) - 1
    return QParams(
        _scale_tensor(amax / bound),
        torch.zeros(w.shape[axis], dtype=torch.int64),
        -bound,
        bound,
        dtype="int8",
        axis=axis,
        method="minmax",
    )


def bias_qparams(input_qparams: QParams, weight: QParams) -> QParams:
    """int32 bias parameters: ``s_b = s_x * s_w`` (per channel when the weight is), ``z = 0``."""
    if input_qparams.axis is not None:
        raise InputError("the input of a quantised layer must be quantised per tensor.")
    scale = input_qparams.scale.double() * weight.scale.double()
    return QParams(
        scale.float(),
        torch.zeros_like(weight.zero_point),
        *INT32,
        dtype="int32",
        axis=0 if weight.axis is not None else None,
        method="bias",
    )


def quantize_bias(bias: torch.Tensor, input_qparams: QParams, weight: QParams) -> torch.Tensor:
    """The int32 values of ``bias`` at scale ``s_x * s_w``; raises when one would overflow.

    A tiny ``s_x * s_w`` against a large bias overflows int32: ORT then enlarges the weight
    scale; here the caller decides (keep the layer in float, or recalibrate).
    """
    qp = bias_qparams(input_qparams, weight)
    b = checked_tensor(bias, "bias").detach().double()
    q = torch.round(b / qp.scale.double())
    if q.abs().max() > INT32[1]:
        worst = int(q.abs().argmax())
        raise GraphoptError(
            f"bias[{worst}] = {b[worst].item():.6g} needs {q.abs().max().item():.3g} steps of "
            f"s_x*s_w = {qp.scale.reshape(-1)[worst if qp.axis is not None else 0].item():.3g}, "
            "more than int32 holds; keep this layer in float or use a coarser weight scale."
        )
    return q.to(torch.int32)


# ------------------------------------------------------------------------------------------------
# input validation


def checked_tensor(x: Any, what: str, batch: int | None = None) -> torch.Tensor:
    """``x`` (a tensor or numpy array) as a tensor; :class:`InputError` unless it is a finite,
    non-empty floating-point tensor. ``what`` and ``batch`` name it in the message."""
    return checked_extrema(x, what, batch)[0]


def checked_extrema(
    x: Any, what: str, batch: int | None = None
) -> tuple[torch.Tensor, float, float]:
    """:func:`checked_tensor` and the minimum and maximum of ``x``, in one pass over it (NaN and
    inf show in the extrema; they are counted only for the message)."""
    where = f"{what}" + (f" (calibration batch {batch})" if batch is not None else "")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"{where} is a {type(x).__name__}, not a tensor; pass torch tensors or numpy arrays."
        )
    if not x.is_floating_point():
        raise InputError(
            f"{where} has dtype {x.dtype}; calibration needs floating-point values "
            "(the float tensor before quantisation)."
        )
    if x.numel() == 0:
        raise InputError(f"{where} is empty (shape {tuple(x.shape)}); pass non-empty batches.")
    lo, hi = (v.item() for v in torch.aminmax(x.detach()))  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = torch.isfinite(x)
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise InputError(
            f"{where} contains {n_nan} NaN and {n_inf} inf values out of {x.numel()}; "
            "calibration statistics would be meaningless. Remove those samples or fix the "
            "pre-processing that produces them."
        )
    return x, lo, hi

"""numpy <-> torch for the values ONNX Runtime, TVM and ``onnx.reference`` take and return.

bfloat16 and float8 are storage types in torch and ``ml_dtypes`` arrays in numpy (as in ONNX);
``tensor.numpy()`` refuses them and ``torch.from_numpy`` refuses ml_dtypes arrays, so every
layer converts through :func:`to_numpy` and :func:`from_numpy`.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes  # a dependency of onnx
import numpy as np
import torch

from graphopt.errors import InputError

# float8: storage only in torch; numpy holds them as ml_dtypes arrays, as ONNX does
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


_NUMPY_FLOAT8 = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
}


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(
            torch.bfloat16
        )
    float8 = _NUMPY_FLOAT8.get(array.dtype.name)
    if float8 is not None:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy()).view(float8)
    if array.dtype == object or array.dtype.kind in "SUV":
        raise TypeError(f"tensors of numpy dtype {array.dtype} have no torch equivalent")
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:  # (u)longlong, as ORT returns
        array = array.view(np.int64 if array.dtype.kind == "i" else np.uint64)
    return torch.from_numpy(np.array(array, copy=True))


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A torch tensor (a copy) of a numpy array, including the ml_dtypes arrays ONNX uses for
    bfloat16 and float8.  Raises TypeError for dtypes torch has no equivalent of (int4, str)."""
    return _to_torch(np.asarray(array))


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array of a tensor or an array, as ONNX Runtime and TVM take them: bfloat16 and
    float8 become ml_dtypes arrays (``tensor.numpy()`` raises ``TypeError: Got unsupported
    ScalarType BFloat16`` for them), every other dtype goes through ``.numpy()``.

        >>> to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype.name
        'bfloat16'
    """
    if isinstance(x, np.ndarray):
        return x
    if not isinstance(x, torch.Tensor):
        raise InputError(f"inputs must be torch tensors or numpy arrays, not {type(x).__name__}.")
    t = x.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16 or t.dtype in FLOAT8:
        bits = t.view(torch.uint16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        return bits.view(getattr(ml_dtypes, str(t.dtype).removeprefix("torch.")))
    return t.numpy()

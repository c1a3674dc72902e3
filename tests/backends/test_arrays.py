"""graphopt.backends.arrays: the numpy <-> torch conversions every layer uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt.backends import arrays
from graphopt.errors import InputError


def test_to_numpy_keeps_arrays_and_gives_bfloat16_and_float8_as_ml_dtypes():
    array = np.ones(3, np.float32)
    assert arrays.to_numpy(array) is array
    assert arrays.to_numpy(torch.arange(3)).tolist() == [0, 1, 2]
    half = arrays.to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    assert half.dtype.name == "bfloat16" and half.astype(np.float32).tolist() == [1.5, -2.0]
    eight = arrays.to_numpy(torch.tensor([0.5, 2.0]).to(torch.float8_e4m3fn))
    assert eight.dtype.name == "float8_e4m3fn" and eight.astype(np.float32).tolist() == [0.5, 2.0]
    with pytest.raises(InputError, match="torch tensors or numpy arrays, not list"):
        arrays.to_numpy([1, 2])


def test_from_numpy_gives_ml_dtypes_arrays_back_as_their_torch_dtype():
    half = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    eight = torch.tensor([0.5, 2.0]).to(torch.float8_e4m3fn)
    for t in (half, eight):
        back = arrays.from_numpy(arrays.to_numpy(t))
        assert back.dtype == t.dtype and torch.equal(back.float(), t.float())
    ulong = arrays.from_numpy(np.array([1, 2], dtype=np.ulonglong))  # as ORT returns uint64
    assert ulong.dtype == torch.uint64 and ulong.tolist() == [1, 2]
    with pytest.raises(TypeError, match="no torch equivalent"):
        arrays.from_numpy(np.array(["a"]))

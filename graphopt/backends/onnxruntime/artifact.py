"""What the ONNX Runtime backend hands back: an ONNX model with its session, run and saved.

A mobile target's artifact checks numbers here on the CPU provider and saves in ORT format for
the phone (``.ort``, see :mod:`graphopt.backends.onnxruntime.mobile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.backends.onnxruntime.mobile import MobilePackage, save_ort_format
from graphopt.errors import BackendError, InputError
from graphopt.target import Target

_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class OrtArtifact:
    """An ONNX model with its session: callable on numpy arrays, savable.

    ``target``: where the model is meant to run; for a mobile target the session here only
    checks numbers, and ``save`` writes ORT format for a ``.ort`` path.
    """

    proto: onnx.ModelProto
    session: ort.InferenceSession
    target: Target | None = None
    mobile_package: MobilePackage | None = None  # set by save("*.ort")
    # why the batch axis is static although a dynamic one was asked for (None: it is dynamic,
    # or was never asked for): the dynamic-batch export or load failed, this says how
    static_shape_reason: str | None = None
    # the Artifact protocol: an ONNX Runtime artifact runs on this machine, never cross-compiled
    rpc = None
    cross_compiled = False

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        metas = self.session.get_inputs()
        if len(arrays) != len(metas):
            raise InputError(
                f"the model takes {len(metas)} input(s) ({', '.join(m.name for m in metas)}), "
                f"but {len(arrays)} were given: pass one array per input, in that order."
            )
        feeds = {}
        for meta, array in zip(self.session.get_inputs(), arrays, strict=True):
            dtype = _NP_DTYPES.get(meta.type)
            # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
            feeds[meta.name] = np.asarray(array, dtype=dtype, order="C")
        try:
            return self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime failed to run the model: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the model: ORT format for a ``.ort`` path, ONNX otherwise.

        The ORT file gets its operator config and XNNPACK session file beside it; the
        :class:`~graphopt.backends.onnxruntime.mobile.MobilePackage` is kept as
        ``mobile_package`` (its ``describe()`` lists the operators a reduced mobile build must
        include); use :func:`graphopt.backends.onnxruntime.mobile.save_ort_format` for the
        converter's options.
        """
        path = Path(path)
        if path.suffix.lower() == ".ort":
            mobile = self.target is None or self.target.device == "mobile"
            self.mobile_package = save_ort_format(
                self.proto, path, target_platform="arm" if mobile else "amd64"
            )
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.proto, str(path))
        return path

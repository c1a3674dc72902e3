"""What the OpenVINO backend hands back: an ONNX model compiled by OpenVINO, run and saved.

``save("model.xml")`` writes OpenVINO's IR (``model.xml`` + ``model.bin``, float weights kept in
f32) that ``openvino.Core().read_model`` loads without graphopt; ``save("model.onnx")`` the
ONNX model OpenVINO compiled. :meth:`OpenVinoArtifact.layer_precisions` reads the runtime graph
OpenVINO executes: which layers run on its int8 kernels.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import openvino as ov

from graphopt.backends.quiet import quiet
from graphopt.errors import BackendError, InputError
from graphopt.target import Target

SUFFIXES = (".xml", ".onnx")
INT8 = ("i8", "u8")
# the runtime graph's layer types that carry the arithmetic of a conv / linear / matmul
COMPUTE_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")


@dataclass
class OpenVinoArtifact:
    """An ONNX model and OpenVINO's compiled model of it: callable on numpy arrays, savable.

    ``model``: the model OpenVINO read (what ``save("*.xml")`` writes); ``compiled``: it
    compiled for the backend's device and settings. One infer request serves every call, one
    call at a time (a lock: OpenVINO's requests are not re-entrant).
    """

    proto: onnx.ModelProto
    model: ov.Model
    compiled: ov.CompiledModel
    target: Target | None = None
    # why the dynamic axes are fixed at the example's sizes (None: they are dynamic, or were
    # never asked for)
    static_shape_reason: str | None = None
    # the Artifact protocol: OpenVINO runs on this machine, never cross-compiled
    rpc = None
    cross_compiled = False
    mobile_package = None
    _request: Any = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._request = self.compiled.create_infer_request()
        self._dtypes = [i.get_element_type().to_dtype() for i in self.compiled.inputs]

    @property
    def input_names(self) -> list[str]:
        return [i.get_any_name() for i in self.compiled.inputs]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) != len(self._dtypes):
            raise InputError(
                f"the model takes {len(self._dtypes)} input(s) ({', '.join(self.input_names)}), "
                f"but {len(arrays)} were given: pass one array per input, in that order."
            )
        # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
        feeds = [
            np.asarray(a, dtype=dtype, order="C")
            for a, dtype in zip(arrays, self._dtypes, strict=True)
        ]
        try:
            with self._lock:
                # share_inputs: no copy in; the outputs are copied out of the request
                result = self._request.infer(feeds, share_inputs=True)
                return [np.asarray(o) for o in result.to_tuple()]
        except Exception as exc:  # OpenVINO raises RuntimeError for everything
            raise BackendError(f"OpenVINO failed to run the model: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write OpenVINO IR for a ``.xml`` path (its weights beside it as ``.bin``, kept in f32,
        graphopt's ``metadata_props`` in its ``rt_info``), the ONNX model for ``.onnx``."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise BackendError(
                f"the openvino backend saves OpenVINO IR ('<name>.xml', with '<name>.bin' beside "
                f"it) or ONNX ('<name>.onnx'), not {path.name!r}."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".onnx":
            onnx.save_model(self.proto, str(path))
            return path
        model = self.model.clone()
        for prop in self.proto.metadata_props:  # what made it (graphopt's stamp)
            model.set_rt_info(prop.value, ["graphopt", prop.key])
        try:
            with quiet():
                ov.save_model(model, str(path), compress_to_fp16=False)
        except RuntimeError as exc:
            raise BackendError(f"OpenVINO could not save {path}: {exc}") from exc
        return path

    def layer_precisions(self) -> Counter[tuple[str, str]]:
        """``(layer type, runtime precision) -> count`` over the runtime graph OpenVINO runs
        (``Convolution``/``u8``: a convolution on OpenVINO's int8 kernels)."""
        counts: Counter[tuple[str, str]] = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            counts[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
        return counts

    def int8_summary(self) -> str:
        """One line: how many compute layers run on OpenVINO's int8 kernels, how many in float."""
        int8: Counter[str] = Counter()
        other: Counter[str] = Counter()
        for (layer, precision), n in self.layer_precisions().items():
            if layer in COMPUTE_LAYERS:
                (int8 if precision in INT8 else other)[layer] += n
        text = f"OpenVINO runs {_counts(int8) or 'no compute layer'} on its int8 kernels"
        return text + (f"; {_counts(other)} in float" if other else "")


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {layer}" for layer, n in sorted(counts.items()))

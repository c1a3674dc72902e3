"""What the OpenVINO backend hands back: an ONNX model compiled by OpenVINO, run and saved.

``save("model.xml")`` writes OpenVINO's IR (``model.xml`` + ``model.bin``, float weights kept in
f32) that ``openvino.Core().read_model`` loads without graphopt; ``save("model.onnx")`` the
ONNX model OpenVINO compiled. :meth:`OpenVinoArtifact.layer_precisions` reads the runtime graph
OpenVINO executes: which layers run on its int8 kernels. On x86 without VNNI those kernels add
pairs of uint8 x int8 products in saturating int16 (:func:`int8_saturation` probes it), so an
int8 artifact can compute other numbers than its QDQ model: ``int8_warnings`` says so.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import openvino as ov
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.openvino.config import compile_config
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

    def int8_warnings(self) -> list[str]:
        """Why this artifact's int8 layers may compute other numbers than its QDQ model: on a
        CPU whose int8 kernels saturate (:func:`int8_saturation`), a warning; else none."""
        runs_int8 = any(
            layer in COMPUTE_LAYERS and precision in INT8
            for layer, precision in self.layer_precisions()
        )
        if not runs_int8 or _weights_within_7_bits(self.proto):
            return []  # no pair of products can leave int16
        if (probe := int8_saturation()) is None:
            return []
        got, exact = probe
        return [
            f"OpenVINO's int8 kernels on this CPU (x86 without VNNI) add pairs of uint8 x int8 "
            f"products in saturating int16 (a probe convolution gave {got:.4g} for {exact:.4g}): "
            "this int8 artifact can be further from its QDQ model than ONNX Runtime's exact "
            "kernels (vit_s: cosine 0.963 against 0.9996 on held-out inputs). Check it on "
            "held-out data, use backend='onnxruntime', or a CPU with VNNI (AVX512-VNNI, AVX-VNNI)."
        ]


def _weights_within_7_bits(proto: onnx.ModelProto) -> bool:
    """Whether every int8 constant a DequantizeLinear reads lies in ``[-64, 63]`` (graphopt's
    7-bit weights): summed in pairs with uint8 activations, its products stay in int16."""
    inits = {t.name: t for t in proto.graph.initializer}
    weights = [
        numpy_helper.to_array(inits[n.input[0]])
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == TensorProto.INT8
    ]
    return bool(weights) and all(w.min() >= -64 and w.max() <= 63 for w in weights)


@functools.cache
def int8_saturation() -> tuple[float, float] | None:
    """(OpenVINO's output, the exact output) of a 1x1 convolution whose uint8 x int8 products
    overflow int16 when summed in pairs (255 x 127 x 2 > 32767), where OpenVINO's CPU kernels
    get it wrong (x86 without VNNI: PMADDUBSW saturates); None where they compute it exactly."""
    channels, scale = 64, 0.01
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    weights = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
        numpy_helper.from_array(np.full((8, channels, 1, 1), 127, np.int8), "w"),
        numpy_helper.from_array(np.full(8, scale, np.float32), "ws"),
    ]
    shape = [1, channels, 2, 2]
    graph = helper.make_graph(
        nodes,
        "int8_saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        weights,
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    core = ov.Core()
    with quiet():
        compiled = core.compile_model(
            core.read_model(probe.SerializeToString()), "CPU", compile_config(1, "latency")
        )
    got = float(compiled([np.full(shape, 255 * scale, np.float32)])[0].ravel()[0])
    exact = 255 * 127 * channels * scale * scale
    return None if abs(got - exact) <= 1e-3 * exact else (got, exact)


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {layer}" for layer, n in sorted(counts.items()))

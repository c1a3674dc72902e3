"""What ONNX Runtime runs: the op types of the graph its session optimizer leaves.

``fused_ops(model)`` opens ``model`` in an ONNX Runtime CPU session with every graph
optimization on (``ORT_ENABLE_ALL``), has it write the optimized graph
(``SessionOptions.optimized_model_filepath``) and counts that graph's op types: whether the
attention reached ``MultiHeadAttention`` (or ``Attention``), the residual adds
``SkipLayerNormalization``, GELU ``BiasGelu``, is read there, not guessed from the export.

>>> counts = fused_ops(result.artifact.proto)
>>> counts["MultiHeadAttention"], counts["SkipLayerNormalization"]
(4, 8)

``openvino_attention(model)`` does the same for OpenVINO: the nodes of the runtime graph its CPU
plugin compiled, each with the ONNX layers it fused; an attention fused there is a ``Subgraph``
(its Snippets kernel) holding the ``Softmax``. OpenVINO fuses the standard form itself, so
fuse-attention leaves that form to it.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

# the op types worth reading in a transformer's optimized graph
FUSED = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
    "Softmax",
)


def fused_ops(model: Any) -> Counter:
    """Op types (``domain::type`` outside the ONNX and ``com.microsoft`` domains) of the graph
    ONNX Runtime runs for ``model`` (a ``ModelProto``, bytes or a path) on the CPU."""
    import onnx
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3  # its "hardware specific optimizations" warning
        source = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(out), load_external_data=False).graph
    return Counter(_op_name(node) for node in graph.node)


def _op_name(node: Any) -> str:
    if node.domain in ("", "ai.onnx", "com.microsoft"):
        return node.op_type
    return f"{node.domain}::{node.op_type}"


def summary(counts: Counter) -> str:
    """The fused-op counts a reader looks for, in one line (``MultiHeadAttention 4, ...``)."""
    return ", ".join(f"{op} {counts[op]}" for op in FUSED if counts[op]) or "none"


def openvino_attention(model: Any) -> list[str]:
    """The fused nodes of OpenVINO's CPU runtime graph for ``model`` (a ``ModelProto`` or a
    path) that hold a ``Softmax``: one ``"<type>: <original layers>"`` line each."""
    import onnx
    import openvino as ov

    core = ov.Core()
    if isinstance(model, onnx.ModelProto):
        model = core.read_model(model.SerializeToString(), b"")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    found = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layers = info["originalLayersNames"].astype(str)
        if "Softmax" in layers and "," in layers:  # a Softmax fused with other layers
            found.append(f"{info['layerType'].astype(str)}: {layers}")
    return found

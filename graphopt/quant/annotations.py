"""What the int8 stage's passes leave in the model for the passes after them.

A pass keeps no state between runs, and the passes of the ONNX stage hand each other nothing
but the model; what a later pass must know of an earlier one is written into the model's
``metadata_props`` under ``graphopt.quant.*`` keys (as FX passes use ``gm.meta``), so that a
copy, a rollback, an IR dump or a reproducer carries it too:

``graphopt.quant.keep_float``      ``{node: reason}``: layers to keep in float (the user's skip
                                   list, fallback-to-float's choice). correct-bias leaves them
                                   alone; insert-qdq and fallback-to-float's trials skip them.
``graphopt.quant.original_bias``   ``{node: bias}``: the bias initializer of each layer as it
                                   was before correct-bias changed it (base64 of the serialised
                                   ``TensorProto``; ``null`` where correct-bias added the bias).
                                   A layer left in float gets it back (:func:`restore_biases`):
                                   its weights are never rounded, so the shift would be an error.

``graphopt.quant.weight_bits``     ``{"bits": 7, "reason": ...}``: the stage quantises weights
                                   to 7 bits (:func:`weight_bits`; absent: 8). correct-bias
                                   measures the rounding insert-qdq will do.

insert-qdq removes them (:func:`strip`): the int8 artifact carries none of them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

import onnx

__all__ = [
    "KEEP_FLOAT",
    "ORIGINAL_BIAS",
    "WEIGHT_BITS",
    "float_marks",
    "mark_float",
    "mark_weight_bits",
    "original_biases",
    "record_original_bias",
    "restore_biases",
    "strip",
    "weight_bits",
]

KEEP_FLOAT = "graphopt.quant.keep_float"
ORIGINAL_BIAS = "graphopt.quant.original_bias"
WEIGHT_BITS = "graphopt.quant.weight_bits"


def _get(model: onnx.ModelProto, key: str) -> dict[str, Any]:
    for entry in model.metadata_props:
        if entry.key == key:
            return json.loads(entry.value)
    return {}


def _put(model: onnx.ModelProto, key: str, value: dict[str, Any]) -> None:
    """Set ``key`` to ``value`` (JSON); an empty ``value`` removes the key."""
    kept = [e for e in model.metadata_props if e.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if value:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)


def float_marks(model: onnx.ModelProto) -> dict[str, str]:
    """The layers marked to stay in float, with the reason."""
    return _get(model, KEEP_FLOAT)


def mark_float(model: onnx.ModelProto, reasons: dict[str, str]) -> None:
    """Mark the nodes of ``reasons`` to stay in float (in place; earlier marks are kept)."""
    _put(model, KEEP_FLOAT, {**float_marks(model), **reasons})


def weight_bits(model: onnx.ModelProto) -> tuple[int, str]:
    """The bits the stage quantises weights to (8 unless marked) and why."""
    marked = _get(model, WEIGHT_BITS)
    return int(marked.get("bits", 8)), str(marked.get("reason", ""))


def mark_weight_bits(model: onnx.ModelProto, bits: int, reason: str) -> None:
    """Quantise ``model``'s weights to ``bits`` (7 or 8) in this stage, for ``reason``."""
    _put(model, WEIGHT_BITS, {"bits": bits, "reason": reason} if bits != 8 else {})


def original_biases(model: onnx.ModelProto) -> dict[str, str | None]:
    """Per corrected layer, its bias before correction (see the module docstring)."""
    return _get(model, ORIGINAL_BIAS)


def record_original_bias(model: onnx.ModelProto, node: str, bias: onnx.TensorProto | None) -> None:
    """Remember ``bias`` (``None``: the layer had none) as ``node``'s bias before correction,
    unless an earlier correction already did (the first original is the one to go back to)."""
    recorded = original_biases(model)
    if node not in recorded:
        data = base64.b64encode(bias.SerializeToString()).decode() if bias is not None else None
        _put(model, ORIGINAL_BIAS, {**recorded, node: data})


def restore_biases(model: onnx.ModelProto, nodes: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``nodes`` have their bias from before correction back (and no
    longer count as corrected); nodes never corrected are left as they are."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    recorded = original_biases(out)
    todo = {n: recorded.pop(n) for n in nodes if n in recorded}
    if not todo:
        return out
    inits = {t.name: t for t in out.graph.initializer}
    added: set[str] = set()
    for node in out.graph.node:
        if node.name not in todo:
            continue
        data = todo[node.name]
        if data is None:  # correction added the bias as the node's last input
            added.add(node.input[-1])
            del node.input[-1]
        else:
            original = onnx.TensorProto.FromString(base64.b64decode(data))
            inits[original.name].CopyFrom(original)
    if added:
        kept = [t for t in out.graph.initializer if t.name not in added]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
    _put(out, ORIGINAL_BIAS, recorded)
    return out


def strip(model: onnx.ModelProto) -> None:
    """Remove the stage's annotations from ``model`` (in place)."""
    for key in (KEEP_FLOAT, ORIGINAL_BIAS, WEIGHT_BITS):
        _put(model, key, {})

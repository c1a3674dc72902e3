"""Reading and validating an ONNX model: a path, serialized bytes or a ``ModelProto``."""

from __future__ import annotations

import logging
import os

import onnx
import onnxruntime as ort

from graphopt.backends.quiet import quiet
from graphopt.errors import CaptureError

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike | bytes | bytearray | memoryview | onnx.ModelProto


def load_onnx(model: ModelSource) -> onnx.ModelProto:
    """Read and validate an ONNX model from a path, serialized bytes or a ``ModelProto``.

    Raises :class:`CaptureError` (never anything else) when the file is missing or unreadable,
    the bytes are not a valid serialized model, or the model fails ``onnx.checker`` and ONNX
    Runtime cannot load it either.
    """
    if isinstance(model, onnx.ModelProto):
        proto, source = model, "the given onnx.ModelProto"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        source = f"the given {len(data)} bytes"
        proto = _parse_bytes(data, source)
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        source = repr(path)
        if not os.path.exists(path):
            raise CaptureError(
                f"ONNX model file {path!r} does not exist. Check the path (relative paths are "
                f"resolved against the current directory {os.getcwd()!r})."
            )
        if not os.path.isfile(path):
            raise CaptureError(
                f"ONNX model path {path!r} is not a file. Pass the path of a .onnx file."
            )
        try:
            proto = onnx.load(path)
        except Exception as exc:  # DecodeError, OSError, external-data errors, ...
            raise CaptureError(
                f"Could not read ONNX model {path!r}: {type(exc).__name__}: {exc}. The file is "
                f"probably truncated or not an ONNX model; re-export or re-download it."
            ) from exc
    else:
        raise CaptureError(
            f"Cannot load an ONNX model from a {type(model).__name__}. Pass a file path, the "
            f"serialized bytes, or an onnx.ModelProto."
        )

    if not proto.HasField("graph") or not proto.graph.output:
        raise CaptureError(
            f"The ONNX model from {source} has no graph or no graph outputs; it is empty or was "
            f"truncated. Re-export or re-download it."
        )
    try:
        onnx.checker.check_model(_checkable(proto))
    except Exception as exc:  # onnx.checker.ValidationError and friends
        reason = str(exc).strip().rstrip(".")
        if _runtime_accepts(proto):  # stricter than the runtime: a deprecated op, say
            log.info("onnx.checker refuses %s (%s); ONNX Runtime loads it", source, reason)
            return proto
        raise CaptureError(
            f"The ONNX model from {source} fails onnx.checker: {reason}. The file is corrupt, "
            f"truncated or was written by a broken exporter; re-export it."
        ) from exc
    return proto


# Ops ONNX Runtime registers in the default domain that ONNX does not define (its transformer
# optimizer writes them); the checker knows no schema for them, so it checks them as contrib ops.
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def _checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto``, or a copy with ORT_DEFAULT_DOMAIN_OPS moved to com.microsoft for the checker."""
    nodes = [n for n in proto.graph.node if n.domain in ("", "ai.onnx")]
    if not any(n.op_type in ORT_DEFAULT_DOMAIN_OPS for n in nodes):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ORT_DEFAULT_DOMAIN_OPS:
            node.domain = "com.microsoft"
    if all(o.domain != "com.microsoft" for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return copy


def _runtime_accepts(proto: onnx.ModelProto) -> bool:
    """ONNX Runtime loads ``proto``: the checker refuses some valid files (GroupNormalization at
    opsets 18-20, which it calls deprecated, while ONNX Runtime runs it); those are imported."""
    try:
        with quiet():  # the user's file: ONNX Runtime's warnings go to the report
            ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure: the checker's verdict stands
        return False
    return True


def _parse_bytes(data: bytes, source: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError, RuntimeWarning, ...
        raise CaptureError(
            f"Could not parse {source} as an ONNX model: {type(exc).__name__}: {exc}. The data "
            f"is truncated or not a serialized onnx.ModelProto."
        ) from exc
    return proto

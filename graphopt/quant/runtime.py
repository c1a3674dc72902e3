"""ONNX Runtime sessions of the int8 stage: calibration runs, probes of intermediate tensors, and
the ``predict`` function a metric scores.

Every session sets :data:`~graphopt.backends.onnxruntime.EXACT_INT8_CONFIG` (through the
backend's ``session_options``): on x86 without VNNI, ORT's uint8 x int8 kernels would otherwise
sum in saturating int16, and an int8 model would be measured far from its QDQ function.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from graphopt.backends.onnxruntime.session import session_options
from graphopt.errors import BackendError
from graphopt.quant.calibration import Batch, to_fixed_batch
from graphopt.quant.graph import fixed_batch, input_names

__all__ = ["feed", "one_torch_thread", "predictor", "probe", "session"]


def session(model: onnx.ModelProto, level: str = "none") -> ort.InferenceSession:
    """A CPU session of ``model`` at graph optimisation ``level`` (``none``: the graph as
    written, for calibration; ``all``: as deployed), on at most 2 threads."""
    opts = session_options(level, threads=min(2, os.cpu_count() or 1))
    # no spinning after a run: torch computes the statistics in between, on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(
            f"ONNX Runtime could not load the model: {type(exc).__name__}: {exc}"
        ) from exc


def probe(model: onnx.ModelProto, tensors: Sequence[str]) -> ort.InferenceSession:
    """A session (graph as written) that also outputs ``tensors``, intermediate float tensors of
    ``model``; run it with the names wanted (graph inputs are not outputs: the caller has them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output} | set(input_names(model))
    for name in tensors:
        if name not in present:
            copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            present.add(name)
    return session(copy)


def feed(model: onnx.ModelProto, batch: Batch) -> dict[str, np.ndarray]:
    """The input dict of one calibration batch (arrays in input order)."""
    return dict(zip(input_names(model), batch, strict=True))


def predictor(model: onnx.ModelProto) -> Callable[..., Any]:
    """``predict(*arrays)``: ``model`` as deployed (all ORT optimisations) on numpy inputs;
    one output as an array, several as a tuple. A fixed-batch model runs piece by piece."""
    sess = session(model, "all")
    names = [i.name for i in sess.get_inputs()]
    fixed = fixed_batch(model)

    def predict(*arrays: Any) -> Any:
        batch = tuple(torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays)
        runs = [
            sess.run(None, {n: x.numpy() for n, x in zip(names, piece, strict=True)})
            for piece in to_fixed_batch([batch], fixed)
        ]
        outs = [np.concatenate(o) if len(runs) > 1 else o[0] for o in zip(*runs, strict=True)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return predict


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block, as it was after: for the statistics of
    the calibration data, element-wise passes over memory that a second thread hardly speeds up
    and that a loaded machine slows down badly (2 cores shared with other work: ``round`` of
    33k floats 13.5 ms on 2 threads, 0.09 ms on one; of 1.6M floats 12 ms and 2.8 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""How much int8 costs: the drop of a metric from the float model to a quantised one.

The metric is the user's ``metric(predict) -> score`` (higher is better; ``predict(*arrays)``
runs a model on numpy inputs, :func:`graphopt.quant.runtime.predictor`) or, by default,
agreement with the float model on the calibration data (:func:`default_metric`): top-1
agreement for a 2-D output of at least 2 classes, output cosine similarity otherwise; the drop
of the default is ``1 - score``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from graphopt.quant.calibration import Batch
from graphopt.quant.runtime import predictor

__all__ = ["Metric", "Scorer", "default_metric"]

Metric = Callable[[Callable[..., Any]], float]


def default_metric(
    reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]
) -> tuple[str, float]:
    """Agreement of ``outputs`` with ``reference`` (lists of per-batch output lists).

    Top-1 agreement of the first output when it is ``[N, classes >= 2]``; otherwise the mean
    per-sample cosine similarity over all outputs. 1.0 means identical.
    """
    first = [r[0] for r in reference]
    if first[0].ndim == 2 and first[0].shape[1] >= 2:
        ref = np.concatenate(first).argmax(1)
        got = np.concatenate([o[0] for o in outputs]).argmax(1)
        return "top-1 agreement with fp32", float((ref == got).mean())
    sims = []
    for ref_b, out_b in zip(reference, outputs, strict=True):
        for r, o in zip(ref_b, out_b, strict=True):
            r64 = r.reshape(r.shape[0], -1).astype(np.float64)
            o64 = o.reshape(o.shape[0], -1).astype(np.float64)
            denom = np.linalg.norm(r64, axis=1) * np.linalg.norm(o64, axis=1)
            sims += list(np.where(denom > 0, (r64 * o64).sum(1) / np.maximum(denom, 1e-300), 1.0))
    return "output cosine with fp32", float(np.mean(sims))


class Scorer:
    """The drop of a quantised model against the float one, on the calibration batches or with
    the user's metric."""

    def __init__(
        self, model: onnx.ModelProto, batches: Sequence[Batch], metric: Metric | None
    ) -> None:
        self.batches = batches
        self.metric = metric
        float_predict = predictor(model)
        if metric is None:
            self.reference = [self._all(float_predict, b) for b in batches]
            self.name = default_metric(self.reference, self.reference)[0]
            self.base = 1.0
        else:
            self.name = getattr(metric, "__name__", "metric")
            self.base = float(metric(float_predict))

    @staticmethod
    def _all(predict: Callable[..., Any], batch: Batch) -> list[np.ndarray]:
        out = predict(*batch)
        return list(out) if isinstance(out, tuple) else [out]

    def drop(self, qmodel: onnx.ModelProto) -> float:
        predict = predictor(qmodel)
        if self.metric is None:
            outs = [self._all(predict, b) for b in self.batches]
            return self.base - default_metric(self.reference, outs)[1]
        return self.base - float(self.metric(predict))

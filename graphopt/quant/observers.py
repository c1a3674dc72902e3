"""Observers: statistics of a tensor over calibration batches, turned into int8 parameters.

The observers differ in how they choose the clipping threshold ``t`` (or range ``lo, hi``) of
the quantisation parameters (:mod:`graphopt.quant.qparams`):

``minmax``      the largest ``|x|`` seen (``min`` / ``max`` for asymmetric).
``percentile``  the ``p``-th percentile of ``|x|`` (e.g. 99.99), read off a histogram.
``entropy``     TensorRT / ONNX Runtime KL calibration: for each candidate cut ``i`` of a
                2048-bin histogram of ``|x|`` (``i`` from 128 bins up), ``P`` = the first ``i``
                bins with the clipped tail added to the last one, ``Q`` = the first ``i`` bins
                merged into 128 levels and spread back evenly over ``P``'s non-empty bins;
                ``t`` = the cut minimising ``KL(P || Q)`` (both smoothed as ORT does).
``mse``         the ``t`` minimising the expected squared error on the histogram:
                ``sum_in h_j * s^2/12  +  sum_clipped h_j * ((m_j - t)^2 + w^2/12)`` with
                ``s = t/127``, bin centres ``m_j`` and width ``w``; exact zeros cost nothing.

Histograms keep a fixed number of bins on each side of zero (memory bounded however many
batches arrive): when a batch exceeds the covered range, the range grows by an integer factor
``k`` and every ``k`` neighbouring bins merge, so no count is ever split between bins.

    >>> obs = PercentileObserver(percentile=99.9)
    >>> for batch in batches:                       # doctest: +SKIP
    ...     obs.observe(batch)
    >>> qp = obs.qparams()                          # doctest: +SKIP
    >>> x_hat = qp.fake_quantize(batch)             # doctest: +SKIP

Not handled here: per-channel activations, int4/int16, float8 (ORT's ``Distribution``); the
entropy observer's asymmetric range is its symmetric threshold clipped to the observed extrema
(as ORT's symmetric-histogram search gives), not a two-sided search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from graphopt._util import close_matches
from graphopt.errors import GraphoptError, InputError
from graphopt.quant.qparams import (
    INT8,
    UINT8,
    QParams,
    asymmetric_qparams,
    checked_extrema,
    symmetric_qparams,
)

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "kl_divergence_curve",
    "make_observer",
    "observe_all",
]


# ------------------------------------------------------------------------------------------------
# observers


class Observer:
    """Accumulates statistics of one tensor over calibration batches; gives its qparams.

    ``observe`` checks every batch (finite floating-point values, the same shape as the first
    batch apart from the batch dimension); ``qparams(symmetric=True)`` gives per-tensor int8,
    ``symmetric=False`` asymmetric uint8. Subclasses implement ``_update``, ``threshold`` and
    ``range``.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.batches = 0
        self._shape: tuple[int, ...] | None = None
        self.min = math.inf
        self.max = -math.inf

    def observe(self, x: torch.Tensor) -> None:
        x, lo, hi = checked_extrema(x, f"tensor observed by {self.name}", self.batches)
        shape = tuple(x.shape[1:]) if x.dim() > 1 else ()
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise InputError(
                f"calibration batch {self.batches} has shape {tuple(x.shape)} but earlier "
                f"batches had (N, {', '.join(map(str, self._shape))}); every batch must have the "
                "model's input shape (only the batch dimension may change)."
            )
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self._update(x.detach(), max(-lo, hi))
        self.batches += 1

    def _update(self, x: torch.Tensor, amax: float) -> None:
        """Add batch ``x`` (finite; ``amax = max|x|``) to the statistics."""

    def _same_statistics(self, other: Observer) -> bool:
        """Whether ``other``'s statistics are a subset of this observer's (fed the same data,
        ``other`` can copy them instead of observing)."""
        return type(other) is MinMaxObserver

    def _copy_statistics(self, other: Observer) -> None:
        self.batches, self._shape, self.min, self.max = (
            other.batches, other._shape, other.min, other.max
        )  # fmt: skip

    def _require_data(self) -> None:
        if not self.batches:
            raise GraphoptError(
                f"the {self.name} observer has seen no data; call observe() on at least one "
                "calibration batch before asking for quantisation parameters."
            )

    def threshold(self) -> float:
        """The symmetric clipping threshold ``t`` (quantised range ``[-t, t]``)."""
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        """The asymmetric clipping range ``(lo, hi)``."""
        raise NotImplementedError

    def qparams(self, symmetric: bool = True) -> QParams:
        self._require_data()
        if symmetric:
            return symmetric_qparams(self.threshold(), self.name)
        return asymmetric_qparams(*self.range(), self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batches={self.batches})"


class MinMaxObserver(Observer):
    """The running minimum and maximum: ``t = max|x|``, range ``[min, max]``."""

    name = "minmax"

    def threshold(self) -> float:
        self._require_data()
        return max(abs(self.min), abs(self.max))

    def range(self) -> tuple[float, float]:
        self._require_data()
        return self.min, self.max


class HistogramObserver(Observer):
    """A histogram of ``x`` with ``bins`` bins on each side of zero over ``[-R, R]``.

    ``pos[j]`` counts ``0 <= x`` with ``|x|`` in ``[j w, (j+1) w)``, ``neg[j]`` counts ``x < 0``
    with ``|x|`` in ``(j w, (j+1) w]`` (bin ``floor(x / w)`` in float32, the bins of
    ``torch.histc`` over ``[-R, R]``), ``w = R / bins``; exact zeros are also counted apart. When a batch reaches past
    ``R``, ``R`` grows by an integer factor ``k`` and every ``k`` bins merge (counts stay exact
    per bin; the resolution stays at least ``bins / 2`` bins over the data).
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 8:
            raise GraphoptError(f"a histogram needs at least 8 bins per side; got {bins}.")
        self.bins = bins
        self.limit = 0.0  # R
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)
        self.zeros = 0

    @property
    def width(self) -> float:
        return self.limit / self.bins

    @property
    def total(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    def abs_hist(self) -> np.ndarray:
        """The histogram of ``|x|``: ``bins`` bins of width ``w`` from 0."""
        return self.pos + self.neg

    def _grow(self, amax: float) -> None:
        if self.limit == 0.0:
            self.limit = amax
            return
        k = math.ceil(amax / self.limit)
        if k <= 1:
            return
        for side in (self.pos, self.neg):
            padded = np.zeros(math.ceil(self.bins / k) * k, dtype=np.int64)
            padded[: self.bins] = side
            merged = padded.reshape(-1, k).sum(1)
            side[:] = 0
            side[: merged.size] = merged
        self.limit *= k

    def _update(self, x: torch.Tensor, amax: float) -> None:
        x = x.reshape(-1)
        self.zeros += x.numel() - int(torch.count_nonzero(x))  # ~10x faster than (x == 0).sum()
        if amax == 0.0:
            self.pos[0] += x.numel()
            return
        if amax > self.limit:
            self._grow(amax)
        # bin floor(x / w) of 2 * bins over [-R, R]: bins - 1 - j is neg[j], bins + j is pos[j];
        # the floor of the scaled value, not histc's (x + R) / w, keeps a tiny negative in
        # neg[0] (x + R == R in float32). float32 and np.bincount: 3x histc in float64 on one
        # thread (ResNet-50's calibration: 14 s); a value within a float32 rounding of an edge
        # may land in the next bin
        index = torch.floor(x * (self.bins / self.limit)).to(torch.int32).add_(self.bins)
        counts = np.bincount(index.clamp_(0, 2 * self.bins - 1).numpy(), minlength=2 * self.bins)
        self.neg += counts[: self.bins][::-1]
        self.pos += counts[self.bins :]

    def _same_statistics(self, other: Observer) -> bool:
        same_histogram = isinstance(other, HistogramObserver) and other.bins == self.bins
        return same_histogram or super()._same_statistics(other)

    def _copy_statistics(self, other: Observer) -> None:
        assert isinstance(other, HistogramObserver)  # _same_statistics
        super()._copy_statistics(other)
        self.limit, self.zeros = other.limit, other.zeros
        self.pos[:], self.neg[:] = other.pos, other.neg

    def _cut(self, threshold: float) -> float:
        """A threshold never beyond the data (a histogram edge may pass ``max|x|``)."""
        return min(threshold, max(abs(self.min), abs(self.max)))

    def range(self) -> tuple[float, float]:
        t = self.threshold()
        return float(max(self.min, -t)), float(min(self.max, t))


class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile``-th percentile of ``|x|`` (range: of ``x`` on both sides)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 0.0 < percentile <= 100.0:
            raise GraphoptError(f"percentile must be in (0, 100]; got {percentile}.")
        self.percentile = percentile

    def _edge(self, hist: np.ndarray, fraction: float) -> float:
        """The upper edge of the first bin where the cumulative count reaches ``fraction``."""
        cdf = np.cumsum(hist) / max(hist.sum(), 1)
        j = int(np.searchsorted(cdf, fraction - 1e-12))
        return min(j + 1, self.bins) * self.width

    def threshold(self) -> float:
        self._require_data()
        if self.limit == 0.0:
            return 0.0
        return self._cut(self._edge(self.abs_hist(), self.percentile / 100.0))

    def range(self) -> tuple[float, float]:
        self._require_data()
        if self.limit == 0.0:
            return 0.0, 0.0
        tail = (100.0 - self.percentile) / 200.0  # half of the clipped mass on each side
        # the signed histogram from -R to R: neg reversed, then pos
        signed = np.concatenate([self.neg[::-1], self.pos])
        cdf = np.cumsum(signed) / max(signed.sum(), 1)
        lo_bin = int(np.searchsorted(cdf, tail - 1e-12, side="left"))
        hi_bin = int(np.searchsorted(cdf, 1.0 - tail - 1e-12, side="left"))
        lo = (lo_bin - self.bins) * self.width
        hi = (hi_bin + 1 - self.bins) * self.width
        return float(max(self.min, lo)), float(min(self.max, hi))


def kl_divergence_curve(
    hist: np.ndarray, quantized_bins: int = 128, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(candidate cuts ``i``, ``KL(P_i || Q_i)``) of the entropy calibration, in bins.

    ``P_i``: ``hist[:i]`` with ``hist[i:].sum()`` added to bin ``i-1``; ``Q_i``: ``hist[:i]``
    merged into ``quantized_bins`` groups, each group's count spread evenly over the bins of
    the group that are non-empty in ``P_i``. Both normalised and smoothed.

    Group ``k`` starts at bin ``floor(linspace(0, i, Qb + 1))[k]``; for ``Qb`` a power of two
    (the default 128) that is ``k i // Qb`` exactly (``i / Qb`` is a binary fraction), and the
    group counts are differences of cumulative sums of the counts (exact for integer counts).
    The cuts are computed :data:`_KL_ROWS` at a time, one row of a matrix each (ResNet-50's 71
    activations: 20.7 s one cut at a time, a second together).
    """
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.size
    cuts = np.arange(min(quantized_bins, n), n + 1, stride)
    if cuts[-1] != n:
        cuts = np.append(cuts, n)
    kl = np.concatenate(
        [
            _kl_rows(hist, cuts[a : a + _KL_ROWS], quantized_bins)
            for a in range(0, cuts.size, _KL_ROWS)
        ]
    )
    return cuts, np.nan_to_num(kl, nan=np.inf)


_KL_ROWS = 128


def _kl_rows(hist: np.ndarray, cuts: np.ndarray, qbins: int) -> np.ndarray:
    """``KL(P_i || Q_i)`` for each cut ``i`` of ``cuts`` (inf where undefined), one row each;
    bins at or past a row's cut are masked out."""
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = hist[i:].sum()
    count = np.concatenate([[0.0], np.cumsum(hist)])
    filled = np.concatenate([[0], np.cumsum(hist != 0)])
    n, m = int(cuts.max()), cuts.size  # no row reads a bin at or past its cut
    hist = hist[:n]
    rows, j = np.arange(m)[:, None], np.arange(n)[None, :]
    i = cuts[:, None]
    inside = j < i
    p = np.where(inside, hist[None, :], 0.0)
    p[rows[:, 0], cuts - 1] += tail[cuts]
    if qbins & (qbins - 1) == 0 and cuts.min() >= qbins:
        starts = np.arange(qbins)[None, :] * i // qbins
    else:  # duplicate starts (a cut below Qb) make empty groups, as np.unique would drop them
        starts = np.floor(np.linspace(0, cuts, qbins + 1, axis=1)[:, :-1]).astype(np.int64)
    ends = np.concatenate([starts[:, 1:], i], axis=1)
    group_sum = count[ends] - count[starts]
    group_nonzero = (filled[ends] - filled[starts]).astype(np.float64)
    group_nonzero[:, -1] += (hist[cuts - 1] == 0) & (tail[cuts] != 0)  # P's last bin: the tail
    per_bin = np.divide(
        group_sum, group_nonzero, out=np.zeros_like(group_sum), where=group_nonzero > 0
    )
    # group of bin j: the last k starting at or before j
    marks = np.zeros((m, n + 1), dtype=np.int64)
    np.add.at(marks, (np.broadcast_to(rows, starts.shape), starts), 1)
    group = np.minimum(np.cumsum(marks[:, :n], axis=1) - 1, qbins - 1)
    nonzero = p != 0
    q = np.take_along_axis(per_bin, group, axis=1) * nonzero
    p_sum, q_sum = p.sum(1, keepdims=True), q.sum(1, keepdims=True)
    valid = (p_sum[:, 0] > 0) & (q_sum[:, 0] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ps = _smooth_rows(p / p_sum, inside)
        qs = _smooth_rows(q / q_sum, inside)
        terms = np.where(inside, ps * np.log(ps / qs), 0.0)
    kl = terms.sum(1)
    kl[~valid | ~np.isfinite(ps).all(1) | ~np.isfinite(qs).all(1)] = np.inf
    return kl


def _smooth_rows(p: np.ndarray, inside: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """ORT's ``smooth_distribution`` on each row of ``p`` over its ``inside`` bins: ``eps``
    moved onto empty bins so that KL stays finite, ``eps`` shrunk where ORT's fixed 1e-4 would
    drive a small non-empty bin negative (ORT asserts there; with 2048 bins it happens). NaN
    rows where every bin is empty."""
    zeros = (p == 0) & inside
    n_zero = zeros.sum(1, keepdims=True).astype(np.float64)
    n_nonzero = inside.sum(1, keepdims=True) - n_zero
    smallest = np.where(inside & ~zeros, p, np.inf).min(1, keepdims=True)
    eps_row = np.where(n_zero > 0, np.minimum(eps, 0.5 * smallest * n_nonzero / n_zero), eps)
    eps1 = eps_row * n_zero / n_nonzero
    out = p + eps_row * zeros - eps1 * (inside & ~zeros)
    return np.where(n_nonzero > 0, out, np.nan)


class EntropyObserver(HistogramObserver):
    """KL-divergence (TensorRT / ORT "entropy") calibration on a ``bins``-bin ``|x|`` histogram.

    The threshold is the upper edge of the cut that minimises ``KL(P || Q)``; ties go to the
    larger cut (less clipping). ``stride`` > 1 searches every ``stride``-th cut only.
    """

    name = "entropy"

    def __init__(self, bins: int = 2048, quantized_bins: int = 128, stride: int = 1) -> None:
        super().__init__(bins)
        if not 2 <= quantized_bins <= bins:
            raise GraphoptError(
                f"quantized_bins must be between 2 and bins ({bins}); got {quantized_bins}."
            )
        self.quantized_bins = quantized_bins
        self.stride = max(1, stride)

    def threshold(self) -> float:
        self._require_data()
        if self.limit == 0.0:
            return 0.0
        hist = self.abs_hist().copy()
        hist[0] -= self.zeros  # a spike of exact zeros (after ReLU) would pull the cut to 0
        cuts, kl = kl_divergence_curve(hist, self.quantized_bins, self.stride)
        if not np.isfinite(kl).any():
            return self._cut(self.limit)
        best = np.flatnonzero(kl <= kl.min() + 1e-12)[-1]
        return self._cut(float(cuts[best]) * self.width)


class MSEObserver(HistogramObserver):
    """The threshold minimising the expected squared quantisation error on the histogram.

    Candidates: every bin edge from ``bins // 64`` bins up (symmetric), or ``alpha * (min, max)``
    for ``alpha`` on a grid of ``grid`` values in ``(0, 1]`` (asymmetric).
    """

    name = "mse"

    def __init__(self, bins: int = 2048, grid: int = 200) -> None:
        super().__init__(bins)
        self.grid = grid

    def _centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin centres and counts of the signed histogram, exact zeros taken out."""
        w = self.width
        centres = np.concatenate([-(np.arange(self.bins)[::-1] + 0.5) * w,
                                  (np.arange(self.bins) + 0.5) * w])  # fmt: skip
        counts = np.concatenate([self.neg[::-1], self.pos]).astype(np.float64)
        counts[self.bins] -= self.zeros  # zeros sit in pos[0] and quantise exactly
        return centres, counts

    def expected_error(self, thresholds: np.ndarray) -> np.ndarray:
        """Expected squared error per element for symmetric int8 at each threshold."""
        h = self.abs_hist().astype(np.float64)
        h[0] -= self.zeros
        w = self.width
        m = (np.arange(self.bins) + 0.5) * w
        t = np.asarray(thresholds, dtype=np.float64)[:, None]
        s = t / INT8[1]
        inside = m[None, :] <= t
        err = np.where(inside, s**2 / 12.0, (m[None, :] - t) ** 2 + w**2 / 12.0)
        return (err * h[None, :]).sum(1) / max(self.total, 1)

    def threshold(self) -> float:
        self._require_data()
        if self.limit == 0.0:
            return 0.0
        first = max(1, self.bins // 64)
        edges = np.arange(first, self.bins + 1) * self.width
        err = self.expected_error(edges)
        return self._cut(float(edges[int(np.argmin(err))]))

    def range(self) -> tuple[float, float]:
        self._require_data()
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        if hi0 - lo0 == 0.0:
            return 0.0, 0.0
        centres, counts = self._centres()
        alphas = np.linspace(1.0 / self.grid, 1.0, self.grid)[:, None]
        lo, hi = alphas * lo0, alphas * hi0
        s = (hi - lo) / (UINT8[1] - UINT8[0])
        x = centres[None, :]
        clipped = np.clip(x, lo, hi)
        err = np.where((x >= lo) & (x <= hi), s**2 / 12.0, (x - clipped) ** 2)
        best = float(alphas[int(np.argmin((err * counts[None, :]).sum(1))), 0])
        return best * lo0, best * hi0


def observe_all(observers: Sequence[Observer], x: torch.Tensor) -> None:
    """``observer.observe(x)`` for each of ``observers`` (which have seen the same batches),
    each kind of statistics computed once: an observer whose statistics an earlier one already
    keeps (the same histogram, or min / max) copies them from it. ``percentile``, ``entropy``
    and ``mse`` differ only in how they read one histogram.
    """
    fed: list[Observer] = []
    # histograms first: min / max is part of what they keep
    for observer in sorted(observers, key=lambda o: not isinstance(o, HistogramObserver)):
        source = next((f for f in fed if f._same_statistics(observer)), None)
        if source is None:
            observer.observe(x)
            fed.append(observer)
        else:
            observer._copy_statistics(source)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(method: str, **options: Any) -> Observer:
    """An observer by name (``minmax``, ``percentile``, ``entropy``, ``mse``) with options."""
    cls = OBSERVERS.get(method)
    if cls is None:
        raise GraphoptError(
            f"unknown calibration method {method!r}; use one of {', '.join(OBSERVERS)}."
            + close_matches(method, OBSERVERS)
        )
    return cls(**options)

"""Calibration observers: known distributions, round-trip bounds, validation, the chooser.

Distributions are chosen so that the right answer is known: on uniform data nothing should be
clipped; on a Gaussian with two far outliers in a million samples, clipping them costs less than
the resolution min-max wastes on them (2 * 46^2 / 1e6 < (50/127)^2 / 12), so every clipping
method must beat min-max on measured error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.errors import GraphoptError, InputError
from graphopt.quant import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    bias_qparams,
    choose_observer,
    fake_quant_error,
    make_observer,
    quantize_bias,
    validate_calibration_batches,
    weight_qparams,
)
from graphopt.testing import seeded

CLIPPING = ("percentile", "entropy", "mse")


_gen = seeded


def _observe(method: str, batches: list[torch.Tensor], **options) -> object:
    obs = make_observer(method, **options)
    for x in batches:
        obs.observe(x)
    return obs


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> list[torch.Tensor]:
    x = torch.randn(1_000_000, generator=_gen(0))
    x[123] = 50.0
    x[456_789] = -50.0
    return list(x.reshape(10, 4, 25_000))  # ten batches of shape (4, 25000)


def test_uniform_every_method_keeps_the_full_range():
    x = torch.rand(8, 20_000, generator=_gen(1)) * 6 - 3
    batches = list(x.split(2))
    amax = x.abs().max().item()
    for method in OBSERVERS:
        obs = _observe(method, batches)
        t = obs.threshold()
        assert t <= amax + 1e-6, method
        # min-max exactly; the histogram methods within a couple of bins (2048 per side)
        assert t >= amax * (1 - (0 if method == "minmax" else 0.01)), (method, t, amax)
    qp = _observe("minmax", batches).qparams()
    assert qp.scale.item() == pytest.approx(amax / 127, rel=1e-6)
    assert int(qp.zero_point) == 0


def test_clipping_methods_clip_outliers_and_beat_minmax(gaussian_with_outliers):
    batches = gaussian_with_outliers
    minmax = _observe("minmax", batches)
    assert minmax.threshold() == 50.0
    base = fake_quant_error(batches, minmax.qparams())
    for method in CLIPPING:
        obs = _observe(method, batches, **({"stride": 4} if method == "entropy" else {}))
        t = obs.threshold()
        assert 3.0 < t < 25.0, (method, t)
        err = fake_quant_error(batches, obs.qparams())
        assert err < 0.9 * base, (method, err, base)


def test_percentile_matches_the_empirical_quantile(gaussian_with_outliers):
    batches = gaussian_with_outliers
    obs = _observe("percentile", batches, percentile=99.9)
    exact = np.quantile(torch.cat([b.reshape(-1) for b in batches]).abs().numpy(), 0.999)
    assert abs(obs.threshold() - exact) <= 2 * obs.width, (obs.threshold(), exact)


def test_asymmetric_relu_output_uses_the_whole_uint8_range():
    x = torch.relu(torch.randn(4, 10_000, generator=_gen(2)))
    for method in OBSERVERS:
        obs = _observe(method, [x])
        qp = obs.qparams(symmetric=False)
        assert qp.dtype == "uint8" and int(qp.zero_point) == 0, method
        lo, hi = obs.range()
        assert lo == 0.0 and 0 < hi <= x.max().item() + 1e-6, (method, lo, hi)
        # one-sided data: asymmetric uint8 halves the step of symmetric int8, so less error
        assert fake_quant_error([x], qp) < fake_quant_error([x], obs.qparams()), method


def test_entropy_ignores_the_spike_of_zeros_after_relu():
    x = torch.relu(torch.randn(200_000, generator=_gen(3)))
    t = _observe("entropy", [x], stride=4).threshold()
    assert t > 2.0, t  # half of the mass at exactly 0 must not pull the cut to the first bins


def test_histogram_growth_merges_bins_without_losing_counts():
    first = torch.rand(1000, generator=_gen(9)) * 2 - 1
    first[:2] = 0.0
    obs = HistogramObserver(bins=64)
    obs.observe(first)
    obs.observe(torch.tensor([7.5, -3.0, 0.0]))
    assert obs.total == 1003
    assert obs.limit >= 7.5 and obs.limit < 2 * 7.5
    assert obs.zeros == 3
    # each count sits in the bin of its |x| (the first batch's maximum, clamped into the last
    # bin of the first range, stays one bin low: its upper edge is still that maximum)
    a = torch.cat([first, torch.tensor([7.5, -3.0, 0.0])]).abs()
    expected = np.bincount(
        torch.clamp((a / obs.width).floor().long(), max=63).numpy(), minlength=64
    )
    assert np.abs(np.cumsum(obs.abs_hist() - expected)).max() <= 1


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    method=st.sampled_from(list(OBSERVERS)),
    symmetric=st.booleans(),
)
def test_fake_quant_round_trip_error_is_at_most_half_a_step_inside_the_range(
    seed, scale, method, symmetric
):
    x = torch.randn(3, 500, generator=_gen(seed)) * scale
    obs = _observe(method, [x], **({"stride": 16} if method == "entropy" else {}))
    qp = obs.qparams(symmetric=symmetric)
    s = qp.scale.double().item()
    lo, hi = (qp.qmin - int(qp.zero_point)) * s, (qp.qmax - int(qp.zero_point)) * s
    xd = x.double()
    inside = (xd >= lo) & (xd <= hi)
    err = (qp.fake_quantize(xd) - xd).abs()
    assert err[inside].max().item() <= s / 2 * (1 + 1e-9)
    # outside the range the value clamps to the nearest end
    clamped = xd.clamp(lo, hi)
    assert torch.allclose(qp.fake_quantize(xd)[~inside], clamped[~inside], atol=s * 1e-6)
    # zero is exactly representable
    assert qp.fake_quantize(torch.zeros(1, dtype=torch.float64)).item() == 0.0


@settings(max_examples=40)
@given(seed=st.integers(0, 2**16), axis=st.sampled_from([0, 1]))
def test_per_channel_weights(seed, axis):
    g = _gen(seed)
    w = torch.randn(6, 5, 3, 3, generator=g) * torch.logspace(-2, 2, 6).reshape(6, 1, 1, 1)
    w[2] = 0.0  # a dead channel must still get a usable scale
    if axis == 1:
        w = w.transpose(0, 1).contiguous()  # ConvTranspose-like layout [C_in, C_out, k, k]
    qp = weight_qparams(w, axis=axis)
    amax = w.abs().transpose(0, axis).reshape(6, -1).amax(1)
    expected = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    torch.testing.assert_close(qp.scale, expected.float())
    q = qp.quantize(w)
    assert q.abs().max() <= 127 and (q.abs().transpose(0, axis).reshape(6, -1).amax(1)[amax > 0]
                                     == 127).all()  # fmt: skip
    shape = [1] * 4
    shape[axis] = -1
    err = (qp.fake_quantize(w.double()) - w.double()).abs()
    assert (err <= qp.scale.double().reshape(shape) / 2 * (1 + 1e-9)).all()
    # per channel beats per tensor when channel ranges differ by 10^4
    per_tensor = MinMaxObserver()
    per_tensor.observe(w.reshape(1, -1))
    assert fake_quant_error([w], qp) < fake_quant_error([w], per_tensor.qparams())


def test_bias_scale_is_input_scale_times_weight_scale():
    x = MinMaxObserver()
    x.observe(torch.randn(2, 16, generator=_gen(4)))
    w = torch.randn(4, 16, generator=_gen(5))
    wq = weight_qparams(w)
    bq = bias_qparams(x.qparams(), wq)
    assert bq.dtype == "int32" and bq.qmin == -(2**31)
    torch.testing.assert_close(bq.scale, (x.qparams().scale * wq.scale).float())
    b = torch.randn(4, generator=_gen(6))
    qb = quantize_bias(b, x.qparams(), wq)
    assert qb.dtype == torch.int32
    err = (qb.double() * bq.scale.double() - b.double()).abs()
    assert (err <= bq.scale.double() / 2 * (1 + 1e-9)).all()
    with pytest.raises(GraphoptError, match="int32"):
        quantize_bias(torch.full((4,), 1e9), x.qparams(), wq)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", list(OBSERVERS))
def test_nan_and_inf_are_clear_errors(bad, method):
    x = torch.randn(2, 10, generator=_gen(7))
    x[1, 3] = bad
    obs = make_observer(method)
    with pytest.raises(InputError, match="NaN .*inf.*Remove those samples"):
        obs.observe(x)


def test_shape_and_type_errors():
    obs = MinMaxObserver()
    obs.observe(torch.randn(2, 3, 4))
    obs.observe(torch.randn(5, 3, 4))  # another batch size is fine
    with pytest.raises(InputError, match=r"shape \(2, 3, 5\).*\(N, 3, 4\)"):
        obs.observe(torch.randn(2, 3, 5))
    with pytest.raises(InputError, match="floating-point"):
        obs.observe(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(InputError, match="empty"):
        obs.observe(torch.empty(0, 3, 4))
    with pytest.raises(InputError, match="not a tensor"):
        obs.observe([1.0, 2.0])
    with pytest.raises(GraphoptError, match="seen no data"):
        PercentileObserver().qparams()
    with pytest.raises(GraphoptError, match="unknown calibration method 'entropie'.*'entropy'"):
        make_observer("entropie")
    with pytest.raises(InputError, match="axis 2 is out of range"):
        weight_qparams(torch.randn(4, 3), axis=2)
    with pytest.raises(InputError, match="4 channels but the tensor has 3"):
        weight_qparams(torch.randn(4, 3)).fake_quantize(torch.randn(3, 3))


def test_validate_calibration_batches():
    ex = (torch.randn(1, 3, 8, 8), torch.randn(1, 5))
    good = [(torch.randn(4, 3, 8, 8), torch.randn(4, 5)) for _ in range(2)]
    assert len(list(validate_calibration_batches(good, ex))) == 2
    with pytest.raises(InputError, match=r"batch 1, input 0 has shape \(4, 3, 9, 8\)"):
        list(validate_calibration_batches([good[0], (torch.randn(4, 3, 9, 8), good[1][1])], ex))
    with pytest.raises(InputError, match="has 1 inputs but the model takes 2"):
        list(validate_calibration_batches([torch.randn(4, 3, 8, 8)], ex))
    bad = torch.randn(4, 5)
    bad[0, 0] = math.nan
    with pytest.raises(InputError, match="calibration batch 0.*1 NaN"):
        list(validate_calibration_batches([(good[0][0], bad)], ex))


def test_chooser_picks_the_lowest_measured_error(gaussian_with_outliers):
    batches = gaussian_with_outliers[:3]
    candidates = ("minmax", "percentile", EntropyObserver(stride=8), "mse")
    choice = choose_observer(batches, candidates, name="conv1.input")
    assert set(choice.errors) == set(OBSERVERS)
    assert choice.errors[choice.method] == min(choice.errors.values())
    assert choice.method != "minmax"
    # the error it reports is the one measured with the parameters it returns
    assert fake_quant_error(batches, choice.qparams) == pytest.approx(choice.errors[choice.method])
    assert "conv1.input" in str(choice)


def test_chooser_prefers_minmax_when_clipping_only_hurts():
    x = torch.rand(4, 5000, generator=_gen(8))
    x[0, 0], x[0, 1] = 1.0, -1.0  # exact ends: nothing to gain by clipping
    choice = choose_observer(x, ("minmax", "percentile"), symmetric=True)
    assert choice.errors["minmax"] <= choice.errors["percentile"]
    assert choice.method == "minmax"


def test_mse_observer_expected_error_tracks_the_measured_error(gaussian_with_outliers):
    batches = gaussian_with_outliers[:2]
    obs = MSEObserver()
    for x in batches:
        obs.observe(x)
    for t in (2.0, 4.0, 8.0):
        from graphopt.quant.qparams import symmetric_qparams

        measured = fake_quant_error(batches, symmetric_qparams(t))
        expected = obs.expected_error(np.array([t]))[0]
        assert expected == pytest.approx(measured, rel=0.1), t


@pytest.mark.parametrize("symmetric", [True, False])
def test_observe_all_equals_each_observer_fed_alone(gaussian_with_outliers, symmetric):
    from graphopt.quant.observers import observe_all

    batches = [torch.relu(x) + 0.1 * x for x in gaussian_with_outliers[:4]]  # skewed
    shared = [make_observer(m) for m in OBSERVERS]
    for x in batches:
        observe_all(shared, x)
    for observer in shared:
        alone = _observe(observer.name, batches)
        assert observer.batches == alone.batches == len(batches)
        assert (observer.min, observer.max) == (alone.min, alone.max)
        assert observer.qparams(symmetric) == alone.qparams(symmetric), observer.name
        if isinstance(observer, HistogramObserver):
            assert np.array_equal(observer.abs_hist(), alone.abs_hist())


def test_auto_calibration_picks_on_a_sample_what_it_picks_on_all_the_data():
    """quantize_onnx(method="auto") measures the candidates on a sample of each batch (its
    largest |x| and AUTO_SAMPLE elements drawn uniformly);
    on activations larger than that it keeps the choice the whole tensor gives."""
    from torch import nn

    from graphopt.backends.export import export_onnx
    from graphopt.quant.qdq import AUTO_SAMPLE, AUTO_TOP, quantize_onnx
    from graphopt.quant.runtime import feed, probe

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    gen = _gen(21)
    calib = [(torch.randn(4, 3, 64, 64, generator=gen).numpy(),) for _ in range(3)]
    calib[1][0][0, 0, 0, 0] = 40.0  # an outlier that clipping methods should cut
    proto = export_onnx(model, (torch.from_numpy(calib[0][0][:1]),))
    _, report = quantize_onnx(proto, calib, method="auto")
    names = list(report.choices)
    session = probe(proto, [n for n in names if n not in feed(proto, calib[0])])
    for name in names:
        full = []
        for batch in calib:
            values = dict(zip([o.name for o in session.get_outputs()],
                              session.run(None, feed(proto, batch)), strict=True))  # fmt: skip
            values.update(feed(proto, batch))
            full.append(torch.from_numpy(values[name]))
        assert full[0].numel() > AUTO_TOP + AUTO_SAMPLE  # the sample is a sample
        exact = choose_observer(full, symmetric=False)
        got = report.choices[name]
        assert got.method == exact.method, (name, got.errors, exact.errors)
        assert got.qparams == exact.qparams
        for method, error in exact.errors.items():
            assert got.errors[method] == pytest.approx(error, rel=0.05), (name, method)


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """ORT's ``smooth_distribution``: move ``eps`` onto empty bins so that KL stays finite.

    ``eps`` shrinks where ORT's fixed 1e-4 would drive a small non-empty bin negative (ORT
    asserts there; with 2048 bins it happens).
    """
    zeros = p == 0
    n_zero = int(zeros.sum())
    n_nonzero = p.size - n_zero
    if n_nonzero == 0:
        return None
    if n_zero:
        eps = min(eps, 0.5 * float(p[~zeros].min()) * n_nonzero / n_zero)
    eps1 = eps * n_zero / n_nonzero
    return p + eps * zeros - eps1 * ~zeros


def _kl_reference(hist, quantized_bins=128, stride=1):
    """The entropy calibration's KL curve as the definition reads, one cut at a time."""
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.size
    cuts = np.arange(min(quantized_bins, n), n + 1, stride)
    if cuts[-1] != n:
        cuts = np.append(cuts, n)
    kl = np.full(cuts.size, np.inf)
    for c, i in enumerate(cuts):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        if p.sum() == 0:
            continue
        starts = np.unique(np.floor(np.linspace(0, i, quantized_bins + 1)[:-1]).astype(np.int64))
        group_sum = np.add.reduceat(hist[:i], starts)
        nonzero = (p != 0).astype(np.float64)
        group_nonzero = np.add.reduceat(nonzero, starts)
        per_bin = np.divide(
            group_sum, group_nonzero, out=np.zeros_like(group_sum), where=group_nonzero > 0
        )
        q = np.repeat(per_bin, np.diff(np.append(starts, i))) * nonzero
        if q.sum() == 0:
            continue
        ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum())
        if ps is None or qs is None:
            continue
        kl[c] = float(np.sum(ps * np.log(ps / qs)))
    return cuts, np.nan_to_num(kl, nan=np.inf)


@pytest.mark.parametrize("seed", range(12))
def test_kl_curve_equals_the_definition(seed):
    from graphopt.quant.observers import kl_divergence_curve

    rng = np.random.default_rng(seed)
    n = int(rng.choice([512, 300, 129, 128, 64]))
    hist = np.floor(np.abs(rng.standard_cauchy(n)) * rng.integers(1, 1000))
    if seed % 3 == 0:
        hist[rng.random(n) < 0.5] = 0  # empty bins inside
    if seed % 4 == 0:
        hist[n // 2 :] = 0  # an empty tail: the last bin of P holds nothing
    if seed == 5:
        hist[:] = 0
        hist[[3, 70]] = 5
    qbins = min(n, int(rng.choice([128, 64, 100])))  # 100: the linspace groups
    stride = int(rng.choice([1, 3]))
    cuts, kl = kl_divergence_curve(hist, qbins, stride)
    ref_cuts, ref = _kl_reference(hist, qbins, stride)
    np.testing.assert_array_equal(cuts, ref_cuts)
    np.testing.assert_array_equal(np.isfinite(kl), np.isfinite(ref))
    finite = np.isfinite(ref)
    scale = max(1.0, np.abs(ref[finite]).max(initial=0))
    assert np.abs(kl[finite] - ref[finite]).max(initial=0) <= 1e-12 * scale

"""The on-disk latency cache: writes from processes and threads merge, only real measurements
are trusted, a corrupt file is ignored (issue 15, items 13 and 14)."""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest

from graphopt.backends.measure import (
    Latency,
    LatencyCache,
    cached_latency,
    time_interleaved,
    valid_latency,
)


def _write_entries(path: str, worker: int, count: int) -> None:
    for k in range(count):  # a fresh cache object each time, as separate optimize() runs do
        LatencyCache(path).put(f"w{worker}-{k}", Latency(1.0 + k, 0.5, 2.0 + k, 10))


def test_processes_writing_the_cache_together_keep_every_entry(tmp_path):
    path = str(tmp_path / "latency.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_entries, args=(path, w, 6)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = LatencyCache(path)
    assert len(cache) == 36  # was: 6 of 36, the last writer's view
    assert cache.get("w3-5") == Latency(6.0, 0.5, 7.0, 10)
    assert not list(tmp_path.glob(".latency-*"))  # no temporary file left behind


def test_threads_writing_one_cache_keep_every_entry(tmp_path):
    path = str(tmp_path / "latency.json")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda w: _write_entries(path, w, 5), range(4)))
    assert len(LatencyCache(path)) == 20


BAD = [
    {"median_ms": float("nan"), "p10_ms": 1.0, "p90_ms": 1.0, "runs": 5},
    {"median_ms": -1.0, "p10_ms": -1.0, "p90_ms": -1.0, "runs": 5},
    {"median_ms": float("inf"), "p10_ms": 1.0, "p90_ms": 1.0, "runs": 5},
    {"median_ms": 1.0, "p10_ms": 1.0, "p90_ms": float("-inf"), "runs": 5},
    {"median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0, "runs": 0},
    {"median_ms": "fast", "p10_ms": 1.0, "p90_ms": 1.0, "runs": 5},
    {"median_ms": 1.0},
]


@pytest.mark.parametrize("entry", BAD)
def test_entries_that_are_not_measurements_are_dropped_on_read(tmp_path, caplog, entry):
    path = tmp_path / "latency.json"
    good = {"median_ms": 2.0, "p10_ms": 1.5, "p90_ms": 3.0, "runs": 20}
    # json writes NaN/Infinity tokens, which Python's json reads back
    path.write_text(json.dumps({"version": 1, "entries": {"bad": entry, "good": good}}))
    with caplog.at_level(logging.WARNING):
        cache = LatencyCache(path)
        assert cache.get("bad") is None  # was: NaN/-1 ms, trusted by merge-convs forever
        assert cache.get("good") == Latency(2.0, 1.5, 3.0, 20)
    if isinstance(entry.get("median_ms"), float) or entry.get("runs") == 0:
        assert "not real measurements" in caplog.text
    # the next write drops it from the file too
    cache.put("other", Latency(1.0, 1.0, 1.0, 3))
    assert "bad" not in json.loads(path.read_text())["entries"]


def test_a_bad_measurement_is_never_written_and_is_measured_again(tmp_path):
    path = tmp_path / "latency.json"
    cache = LatencyCache(path)
    nan = Latency(float("nan"), float("nan"), float("nan"), 5)
    assert valid_latency(nan) is None and valid_latency(Latency(0.0, 0.0, 0.0, 1)) is not None
    cache.put("k", nan)
    assert not path.exists() and cache.get("k") is None
    calls = []

    def measure():
        calls.append(1)
        return nan if len(calls) == 1 else Latency(1.0, 0.9, 1.1, 5)

    assert cached_latency("k", measure, cache, True) is nan
    assert cached_latency("k", measure, cache, True) == Latency(1.0, 0.9, 1.1, 5)
    assert len(calls) == 2 and LatencyCache(path).get("k") == Latency(1.0, 0.9, 1.1, 5)


@pytest.mark.parametrize(
    "content", [b"{not json", b"\xff\xfe\x00garbage", b"", b'{"version": 1, "entries": [1]}']
)
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_replaced(tmp_path, caplog, content):
    path = tmp_path / "latency.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        cache = LatencyCache(path)
        assert cache.get("k") is None and len(cache) == 0
        cache.put("k", Latency(1.0, 0.9, 1.2, 10))  # the merge re-reads it: no crash either
    assert "ignoring latency cache" in caplog.text
    assert LatencyCache(path).get("k") == Latency(1.0, 0.9, 1.2, 10)


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "lat.json"
    for content in ("{not json", json.dumps({"version": 99, "entries": {}}), "[1, 2]"):
        path.write_text(content)
        cache = LatencyCache(path)
        with caplog.at_level(logging.WARNING):
            assert cache.get("anything") is None
        assert "ignoring latency cache" in caplog.text
        caplog.clear()
        cache.put("k", Latency(1.0, 0.9, 1.2, 10))
        assert LatencyCache(path).get("k") == Latency(1.0, 0.9, 1.2, 10)


def test_latency_statistics_and_interleaving():
    lat = Latency.from_samples([0.001, 0.002, 0.003, 0.004, 0.100])
    assert lat.median_ms == pytest.approx(3.0)
    assert lat.p10_ms < lat.median_ms < lat.p90_ms
    order = []
    result = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=0, runs=3, rewarm=0
    )
    assert order == ["a", "b", "b", "a", "a", "b"]  # the order rotates every round
    assert result["a"].runs == result["b"].runs == 3


@pytest.mark.parametrize("rewarm", [0, 2])
def test_interleaved_timing_rewarms_each_timed_call(rewarm):
    calls = {"a": 0, "b": 0}

    def make(key):
        def fn():
            calls[key] += 1

        return fn

    timings = time_interleaved(
        {"a": make("a"), "b": make("b")}, warmup=2, runs=6, max_time_s=10.0, rewarm=rewarm
    )
    assert all(t.runs == 6 and t.median_ms >= 0 for t in timings.values())
    assert calls == {"a": 2 + 6 * (1 + rewarm), "b": 2 + 6 * (1 + rewarm)}


def test_median_bounds_are_distribution_free_order_statistics():
    from graphopt.backends.measure import median_known_within

    steady = [1.0 + 0.001 * (i % 7) for i in range(10)]
    assert median_known_within(steady, 0.02)
    # one slow call in ten leaves the median where it was: the bounds are ranks, not a mean
    assert median_known_within([*steady[:9], 50.0], 0.02)
    # half the calls 10% slower: the median could be either, not known within 2%
    assert not median_known_within([1.0] * 5 + [1.1] * 5, 0.02)
    assert median_known_within([1.0] * 5 + [1.1] * 5, 0.2)


def test_a_precision_stop_times_fewer_rounds_only_where_the_medians_are_known(monkeypatch):
    """On a clock that each call moves by a set duration (real no-op timings are the machine's
    noise: a loaded CI worker once put one median 2x off): equal durations stop at MIN_ROUNDS,
    durations alternating 1 and 3 never give a median within 5% and run every round."""
    import itertools

    from graphopt.backends import measure

    clock = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def takes(durations):
        it = iter(durations)

        def call():
            clock[0] += next(it)

        return call

    flat = time_interleaved(
        {"a": takes(itertools.repeat(1.0)), "b": takes(itertools.repeat(2.0))},
        warmup=0,
        runs=40,
        rewarm=0,
        max_time_s=1e9,
        precision=0.01,
    )
    assert {k: (t.runs, t.median_ms) for k, t in flat.items()} == {
        "a": (10, 1000.0),
        "b": (10, 2000.0),
    }  # MIN_ROUNDS, then every median is known
    wobbly = time_interleaved(
        {"a": takes(itertools.cycle([1.0, 3.0]))},
        warmup=0,
        runs=16,
        rewarm=0,
        max_time_s=1e9,
        precision=0.05,
    )
    assert wobbly["a"].runs == 16
    assert measure.median_known_within([1.0, 3.0] * 8, 1.0)  # what a looser precision accepts


def test_fewer_torch_threads_when_loaded(monkeypatch):
    """On a loaded machine graphopt's own torch work runs on one thread, says so, and leaves
    torch's setting as it was; on an idle one nothing changes."""
    from types import SimpleNamespace

    import torch

    from graphopt.backends.measure import available_cores, fewer_torch_threads_when_loaded

    seen = []

    @fewer_torch_threads_when_loaded
    def work():
        seen.append(torch.get_num_threads())
        return SimpleNamespace(report=SimpleNamespace(notes=[]))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr("os.getloadavg", lambda: (10.0 * available_cores(), 0.0, 0.0))
        loaded = work()
        assert seen[-1] == 1 and torch.get_num_threads() == 2
        assert "on 1 thread instead of 2" in loaded.report.notes[0]
        monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
        idle = work()
        assert seen[-1] == 2 and not idle.report.notes
    finally:
        torch.set_num_threads(before)

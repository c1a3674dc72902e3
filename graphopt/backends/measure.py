"""Latency measurement shared by all backends, and the on-disk latency cache.

A measurement warms up, then times single runs until it has ``runs`` samples (or ``max_time_s``
has passed, with at least 5 samples) and reports the median and the 10th/90th percentiles.
Latency-aware passes ask a backend for ``measure(...)``; results are cached on disk keyed by
(graph fingerprint, target, backend and its version, input shapes, session settings), so a
second run measures nothing. Processes and threads share the file: a write merges its entry into
what is on disk under a file lock. A corrupt cache file, and any entry that is not a real
measurement (NaN, infinite or negative), is reported and ignored, never fatal.

:class:`UnitTimer` is what the latency-aware passes (merge-convs, substitute-monarch) time their
units with: an in-run memo over that cache, interleaved timing, the RPC device where there is
one; :func:`backend_for`, :func:`cache_for` and :func:`measurable` pick what it times on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from graphopt._util import cache_dir
from graphopt.backends import get_backend
from graphopt.core.progress import Progress, current

if TYPE_CHECKING:  # pragma: no cover
    from graphopt.backends.base import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Latency:
    """Latency of one call, in milliseconds: median and spread over ``runs`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread of the samples."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, n={self.runs})"
        )

    @classmethod
    def from_samples(cls, samples_s: list[float]) -> Latency:
        ms = sorted(s * 1e3 for s in samples_s)
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        return cls(statistics.median(ms), q[0], q[-1], len(ms))


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 5,
    runs: int = 50,
    max_time_s: float = 10.0,
    progress: Any = None,
) -> Latency:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``runs`` timed ones."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + max_time_s
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
        if time.perf_counter() > deadline and len(samples) >= 5:
            break
    return Latency.from_samples(samples)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 5,
    runs: int = 50,
    max_time_s: float = 20.0,
    rewarm: int = 2,
    precision: float | None = None,
) -> dict[str, Latency]:
    """Time several callables in alternation, so drift in machine load hits them alike.

    Each timed call follows ``rewarm`` untimed calls of the same callable, and the order
    rotates every round. Back to back, each runtime's worker threads keep spinning after a call
    and take the cores from the next one (measured on resnet18, 2 idle cores: ONNX Runtime 17.6
    -> 24.3 ms, OpenVINO 16.8 -> 31.0 ms); with 2 re-warm calls each matches its time alone
    within a few percent. ``rewarm=0`` times back to back. ``max_time_s`` bounds the loop,
    untimed calls included; at least 5 rounds are timed. ``precision``: stop early, after
    :data:`MIN_ROUNDS` rounds, once every median is known within ``precision`` of itself
    (:func:`median_known_within`), as an idle machine allows long before ``runs``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    deadline = time.perf_counter() + max_time_s
    order = list(fns.items())
    for i in range(runs):
        # rotate: whatever the previous callable leaves behind falls on every one alike
        for key, fn in order[i % len(order) :] + order[: i % len(order)]:
            for _ in range(rewarm):
                fn()
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(next(iter(samples.values()))) >= 5:
            break
        known = precision is not None and i + 1 >= MIN_ROUNDS
        if known and all(median_known_within(v, precision) for v in samples.values()):
            break
    return {k: Latency.from_samples(v) for k, v in samples.items()}


MIN_ROUNDS = 10  # the least a precision stop times: 95% median bounds need a few samples


def median_known_within(samples: list[float], precision: float) -> bool:
    """Whether the median of ``samples`` lies within ``precision`` (relative) of the sample
    median with 95% confidence, whatever their distribution: the order statistics at ranks
    ``n/2 -+ 0.98 sqrt(n)`` bound the true median (binomial, normal approximation), and the
    interval between them must fit in ``median * (1 -+ precision)``."""
    n = len(samples)
    ranked = sorted(samples)
    lo = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    hi = min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)) - 1)
    median = statistics.median(ranked)
    return ranked[hi] - median <= precision * median and median - ranked[lo] <= precision * median


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


F = TypeVar("F", bound=Callable[..., Any])


def fewer_torch_threads_when_loaded(fn: F) -> F:
    """Run ``fn`` (returning an object with a ``report``) with torch on one intra-op thread
    while the machine is loaded: its 1-minute load average at or above the cores this process
    may run on. A parallel region then waits for a thread the scheduler gives to other work:
    on 2 shared cores at load 6, ResNet-50's forward took 0.8-1.0 s on torch's 2 threads and
    0.27-0.31 s on one, and ``optimize(resnet50)`` 90 s against 47 s. The report's notes say
    so; torch's setting is restored after. Latencies are measured in the backends' own thread
    pools, which this leaves alone."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        cores, threads = available_cores(), torch.get_num_threads()
        if threads == 1 or load < cores:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            result = fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
        result.report.notes.append(
            f"torch ran graphopt's own work (capture, checks, export, calibration statistics) "
            f"on 1 thread instead of {threads}: the machine was loaded (1-minute load average "
            f"{load:.1f} on {cores} cores)"
        )
        return result

    return wrapper  # type: ignore[return-value]


def cache_key(**parts: Any) -> str:
    """A stable key from keyword parts (fingerprint, target, backend, version, shapes...)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# bump when how units are timed changes, so cached latencies from before are not reused
# (2: ONNX Runtime sessions stop spinning after each run)
TIMING_VERSION = 2


def backend_key(backend: Backend, runs: int, **parts: Any) -> str:
    """:func:`cache_key` of a unit timed on ``backend``: ``parts`` say what the unit is, the
    backend's target, name, version and session settings and the run count say where and how
    it was timed (latency-aware passes cache their per-layer measurements under it)."""
    return cache_key(
        **parts,
        timing=TIMING_VERSION,
        target=str(backend.target),
        backend=backend.name,
        version=backend.version,
        settings=backend.settings(),
        runs=runs,
    )


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # no stray temporary file beside the cache
        raise


def cached_latency(
    key: str, measure: Callable[[], Latency], cache: LatencyCache | None, use_cache: bool
) -> Latency:
    """``measure()``, or its earlier result under ``key`` in ``cache`` (default: the disk
    cache); ``use_cache=False`` always measures and stores nothing. The backends' ``measure``."""
    if not use_cache:
        return measure()
    cache = cache if cache is not None else LatencyCache()
    if (hit := cache.get(key)) is not None:
        return hit
    latency = measure()
    cache.put(key, latency)
    return latency


def valid_latency(entry: Any) -> Latency | None:
    """``entry`` (a cache entry or a Latency) as a Latency, or None when it is not a real
    measurement: a NaN, infinite or negative time, or fewer than one run. One such entry would
    otherwise be trusted forever by every latency-aware pass."""
    try:
        if isinstance(entry, Latency):
            latency = entry
        else:
            latency = Latency(
                float(entry["median_ms"]),
                float(entry["p10_ms"]),
                float(entry["p90_ms"]),
                int(entry["runs"]),
            )
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    times = (latency.median_ms, latency.p10_ms, latency.p90_ms)
    if not all(math.isfinite(t) and t >= 0 for t in times) or latency.runs < 1:
        return None
    return latency


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` (where there is no flock: no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class LatencyCache:
    """A JSON file of ``key -> Latency``, shared by processes.

    A write merges: under an exclusive lock on ``<file>.lock`` it re-reads the file, adds its
    entry and replaces the file atomically, so processes writing together keep every entry.
    Entries that are not real measurements (NaN, infinite or negative times) are dropped on read
    and never written. A file that is not a latency cache (bad JSON, another version) is ignored
    with a warning and rewritten on the next write; it is never an error.
    """

    VERSION = 1

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "latency.json"
        self._entries: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        """The valid entries of the file on disk (none when it is missing or unreadable)."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if (
                not isinstance(data, dict)
                or data.get("version") != self.VERSION
                or not isinstance(data.get("entries"), dict)
            ):
                raise ValueError(f"not a graphopt latency cache of version {self.VERSION}")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
            log.warning("ignoring latency cache %s (%s); it will be rewritten", self.path, exc)
            return {}
        entries = {}
        dropped = 0
        for key, value in data["entries"].items():
            if (latency := valid_latency(value)) is not None:
                entries[key] = asdict(latency)
            else:
                dropped += 1
        if dropped:
            log.warning(
                "latency cache %s: ignored %d entr%s that are not real measurements (NaN, "
                "infinite or negative times); they will be measured again",
                self.path,
                dropped,
                "y" if dropped == 1 else "ies",
            )
        return entries

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, key: str) -> Latency | None:
        entry = self._load().get(key)
        return None if entry is None else valid_latency(entry)

    def put(self, key: str, latency: Latency) -> None:
        if valid_latency(latency) is None:
            log.warning("not caching %s for %s: not a real measurement", latency, key)
            return
        entries = self._load()
        entries[key] = asdict(latency)
        try:
            with self._lock, _file_lock(self.path):
                # read-modify-write under the lock: what other processes wrote since is kept
                merged = {**self._read(), key: asdict(latency)}
                write_json_atomic(self.path, {"version": self.VERSION, "entries": merged})
            entries.update(merged)
        except OSError as exc:  # a read-only cache dir costs re-measuring, nothing more
            log.warning("could not write latency cache %s: %s", self.path, exc)

    def __len__(self) -> int:
        return len(self._load())


# ------------------------------------------------------------------------------------------------
# timing the units of latency-aware passes


class UnitTimer:
    """Times a pass's units (small modules at given input shapes; whole graphs too) on
    ``backend``, through an in-run memo and the latency ``cache`` (None: the memo only).

    Where one unit of a group is neither in the memo nor the cache, the whole group is timed in
    one interleaved run (:func:`time_interleaved`, 3 warm-up calls, 2 re-warm calls), so its
    ratios come from one machine state, and every latency is stored. On an RPC device the
    device times each unit in turn (``backend.measure``). ``progress`` shows a bar on stderr
    while compiling, which is most of the measuring time; ``name`` labels it. ``measured``
    counts the units timed in this run (the rest came from the memo or the cache).
    """

    def __init__(
        self,
        backend: Backend,
        cache: LatencyCache | None,
        *,
        runs: int,
        max_time_s: float,
        progress: bool = False,
        name: str = "graphopt",
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.runs = runs
        self.max_time_s = max_time_s
        self.progress = progress
        self.name = name
        self.memo: dict[str, Latency] = {}
        self.measured = 0

    def key(self, **parts: Any) -> str:
        """:func:`backend_key` of a unit described by ``parts``, timed here."""
        return backend_key(self.backend, self.runs, **parts)

    def latencies(
        self,
        units: dict[str, tuple[Any, list[tuple[int, ...]]]],
        dtype: Any,
        keys: dict[str, str] | None = None,
    ) -> dict[str, Latency]:
        """``{label: latency}`` of ``units`` (``{label: (module, input shapes)}``, random inputs
        of ``dtype``); ``keys``: each label's cache key (default: the labels are the keys)."""
        keys = keys if keys is not None else {label: label for label in units}

        def timed() -> dict[str, Latency]:
            return {keys[label]: lat for label, lat in self._time(units, dtype).items()}

        by_key = self.cached(list(keys.values()), timed)
        return {label: by_key[keys[label]] for label in units}

    def cached(self, keys: list[str], time: Callable[[], dict[str, Latency]]) -> dict[str, Latency]:
        """``{key: latency}`` from the memo or the cache; where one is missing, ``time()``
        times them all in one run, and every latency is stored."""
        found: dict[str, Latency] = {}
        for key in keys:
            hit = self.memo.get(key) or (self.cache.get(key) if self.cache is not None else None)
            if hit is not None:
                found[key] = hit
        if len(found) == len(keys):
            return found
        timed = time()
        self.measured += len(timed)
        for key, latency in timed.items():
            self.memo[key] = latency
            if self.cache is not None:
                self.cache.put(key, latency)
        return timed

    def _time(
        self, units: dict[str, tuple[Any, list[tuple[int, ...]]]], dtype: Any
    ) -> dict[str, Latency]:
        import torch

        gen = torch.Generator().manual_seed(0)
        return self.time_modules(
            {
                label: (unit, tuple(torch.randn(s, generator=gen).to(dtype) for s in shapes))
                for label, (unit, shapes) in units.items()
            },
            self.runs,
        )

    def time_modules(
        self, modules: dict[str, tuple[Any, tuple[Any, ...]]], runs: int
    ) -> dict[str, Latency]:
        """Modules (units or whole graphs) with their inputs, each compiled on the backend and
        timed interleaved (on an RPC device: each in turn, where the device times it)."""
        max_time = self.max_time_s
        if self.backend.rpc is not None:  # the device times each library
            return {
                key: self.backend.measure(
                    module, inputs, runs=runs, max_time_s=max_time, use_cache=False
                )
                for key, (module, inputs) in modules.items()
            }
        import torch

        calls = {}
        say = current() if current().enabled or not self.progress else Progress(True)
        # compiling is most of the measuring time
        for key in say.track(list(modules), f"{self.name}: compiling", unit="unit"):
            module, inputs = modules[key]
            artifact = self.backend.compile(module, inputs)
            arrays = [x.numpy() if isinstance(x, torch.Tensor) else x for x in inputs]
            calls[key] = lambda a=artifact, arrays=arrays: a.run(arrays)
        with say.phase(f"{self.name}: timing {len(modules)} interleaved", estimate_s=max_time):
            return time_interleaved(calls, warmup=3, runs=runs, max_time_s=max_time, rewarm=2)


def backend_for(ctx: Any) -> Backend:
    """The backend a latency-aware pass measures on: ``ctx.backend``, else ONNX Runtime on
    ``ctx.target`` (default ``cpu``)."""
    if ctx.backend is not None:
        return ctx.backend
    return get_backend("onnxruntime", ctx.target or "cpu")


def cache_for(ctx: Any, backend: Backend) -> LatencyCache:
    """The latency cache in ``ctx.cache_dir``, else the backend's cache, else the default one."""
    if ctx.cache_dir is not None:
        return LatencyCache(ctx.cache_dir / "latency.json")
    return backend.cache if backend.cache is not None else LatencyCache()


def measurable(backend: Backend) -> bool:
    """A phone or board is timed only through its RPC device, never on this machine."""
    return backend.rpc is not None or backend.target.device != "mobile"

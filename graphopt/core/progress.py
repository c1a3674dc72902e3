"""Progress a user sees while graphopt works: phase lines on stderr that are never silent long.

``say = Progress(True)``; ``say("lowering to tvm")`` prints a phase line (``[  12.3s] lowering
to tvm``) and makes it the current phase. :meth:`Progress.phase` is a nested phase: with a known
``total`` a tqdm bar (its rate gives the estimate), with an ``estimate_s`` the time left, with
neither the elapsed time. :meth:`Progress.status` names the current phase without a line (the
pass manager's ``[3/7] fold-conv-bn`` while the pass runs).

Inside :meth:`Progress.active` a daemon thread keeps the current phase alive: after
``heartbeat_s`` without output it redraws a status line (``[  52.0s] measuring latency ... 35 s``)
or refreshes the bar, so a phase stays visible even inside one long call into ONNX Runtime, TVM
or torch (they release the GIL while they compute; the thread needs it only to write). On a
stream that is not a terminal (CI logs, pipes) nothing is redrawn: plain lines, one every
``plain_every_s`` while a phase lasts. ``active()`` also makes the object :func:`current`, so
code far from ``optimize()`` (a pass, the calibration, the TVM tuner, the unit timer) shows its
phases with ``current().phase(...)``; outside it, :func:`current` is a disabled ``Progress``.

>>> say = Progress(True)
>>> with say.active():
...     say("measuring latency")
...     with current().phase("compiling", total=len(units), unit="unit") as bar:
...         for unit in units:
...             compile(unit)
...             bar.update()
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any, TypeVar

T = TypeVar("T")
_CLEAR = "\r\x1b[K"  # carriage return, erase to the end of the line
_TICK_S = 0.2  # how often the heartbeat thread looks


class Phase:
    """One phase: its name, progress (``n`` of ``total`` ``unit``) and a note. Update it with
    :meth:`update` / :meth:`note`; :meth:`Progress.phase` draws it."""

    def __init__(
        self,
        owner: Progress | None,
        name: str,
        total: float | None = None,
        unit: str = "",
        estimate_s: float | None = None,
    ) -> None:
        self.owner = owner
        self.name = name
        self.total = total
        self.unit = unit
        self.estimate_s = estimate_s
        self.start = time.perf_counter()
        self.n: float = 0
        self.postfix = ""
        self.bar: Any = None  # a tqdm bar, on a terminal with a known total

    def update(self, n: float = 1) -> None:
        """``n`` more done."""
        self.n += n
        if self.owner is not None:
            self.owner.updated(self)

    def set(self, n: float) -> None:
        """``n`` done in all."""
        self.update(n - self.n)

    def note(self, text: str) -> None:
        """A short note after the counts (the tuner's current estimate, say)."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def describe(self, now: float | None = None) -> str:
        """``name: n/total unit (pct%), 12 s, ~40 s left (note)`` as far as known."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self.start
        parts = [self.name]
        left = None
        if self.total:
            unit = f" {self.unit}" if self.unit else ""
            parts.append(f": {self.n:g}/{self.total:g}{unit} ({100 * self.n / self.total:.0f}%),")
            if self.n > 0:
                left = elapsed * (self.total - self.n) / self.n
        if left is None and self.estimate_s is not None:
            left = max(0.0, self.estimate_s - elapsed)
        parts.append(f" {_duration(elapsed)}")
        if left is not None:
            parts.append(f", ~{_duration(left)} left")
        if self.postfix:
            parts.append(f" ({self.postfix})")
        return "".join(parts)


class Progress:
    """Phase lines on ``stream`` (default: ``sys.stderr`` at each write) with the elapsed time,
    when ``enabled``; see the module docstring. ``tty``: redraw a status line (default: whether
    ``stream`` is a terminal, asked once, here); ``heartbeat_s``: the longest silence on a
    terminal inside :meth:`active`; ``plain_every_s``: the same elsewhere."""

    def __init__(
        self,
        enabled: bool = True,
        prefix: str = "",
        *,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        heartbeat_s: float = 1.0,
        plain_every_s: float = 10.0,
    ) -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.stream = stream
        self.tty = _isatty(stream or sys.stderr) if tty is None else tty
        self.heartbeat_s = heartbeat_s
        self.plain_every_s = plain_every_s
        self.start = time.perf_counter()
        columns = _columns(stream or sys.stderr) if self.tty else 0
        self.sized = columns > 0  # the terminal reports its width (not a bare pty)
        self.width = columns or 100
        self._lock = threading.RLock()
        self._stage: Phase | None = None  # the phase of the last __call__ or status()
        self._phases: list[Phase] = []  # explicit phases, innermost last
        self._last_output = time.perf_counter()
        self._status_shown = False
        self._alive = 0  # active() / phase() blocks open: the heartbeat runs while > 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- what callers use --------------------------------------------------------------------

    def __call__(self, message: str) -> None:
        """A phase line; ``message`` is the current phase until the next one."""
        if not self.enabled:
            return
        with self._lock:
            self.line(f"[{self.prefix}{self.elapsed():6.1f}s] {message}")
            self._stage = Phase(self, message)

    def status(self, message: str) -> None:
        """``message`` becomes the current phase without a line of its own (the heartbeat shows
        it once it lasts)."""
        if self.enabled:
            with self._lock:
                self._stage = Phase(self, message)

    def done(self) -> None:
        """The current phase is over: its status line is cleared and nothing is kept alive
        until the next phase (before printing a report to stdout, say)."""
        if self.enabled:
            with self._lock:
                self._stage = None
                self._clear_status()

    def note(self, text: str) -> None:
        """A note on the innermost :meth:`phase` (what it is at: a layer's name, say)."""
        if self.enabled and self._phases:
            self._phases[-1].note(text)

    def line(self, text: str) -> None:
        """Print ``text`` as a line of its own (above a status line or bar)."""
        if not self.enabled:
            return
        with self._lock:
            bars = [p.bar for p in self._phases if p.bar is not None]
            for bar in bars:
                bar.clear()
            self._clear_status()
            self._write(text + "\n")
            for bar in bars:
                bar.refresh()

    @contextmanager
    def phase(
        self,
        name: str,
        total: float | None = None,
        *,
        unit: str = "",
        estimate_s: float | None = None,
        leave: bool = False,
    ) -> Iterator[Phase]:
        """A nested phase for the block; yields the :class:`Phase` to update. With ``total``:
        a tqdm bar on a terminal (``leave``: keep it when done), else the counts in the lines.
        Disabled, it yields a phase that counts and draws nothing."""
        if not self.enabled:
            yield Phase(None, name, total, unit, estimate_s)
            return
        phase = Phase(self, name, total, unit, estimate_s)
        with self._lock:
            self._clear_status()
            if total and self.tty:
                phase.bar = _bar(self, name, total, unit, leave)
            self._phases.append(phase)
            self._last_output = time.perf_counter()
        self._keep_alive(+1)
        try:
            yield phase
        finally:
            self._keep_alive(-1)
            with self._lock:
                self._phases.remove(phase)
                for outer in self._phases:  # the note a phase inside it borrowed
                    if outer.bar is not None:
                        outer.bar.set_postfix_str(outer.postfix, refresh=False)
                if phase.bar is not None:
                    phase.bar.close()
                elif total and time.perf_counter() - phase.start >= self.plain_every_s:
                    self.line(f"[{self.prefix}{self.elapsed():6.1f}s] {phase.describe()}")
                self._last_output = time.perf_counter()

    def track(
        self, items: Iterable[T], name: str, *, unit: str = "", total: float | None = None
    ) -> Iterator[T]:
        """``items``, one by one, as a :meth:`phase` (``total``: default ``len(items)``)."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        with self.phase(name, total, unit=unit) as phase:
            for item in items:
                yield item
                phase.update()

    @contextmanager
    def active(self) -> Iterator[Progress]:
        """This object is :func:`current` for the block, and its phases are kept alive."""
        token = _current.set(self)
        self._keep_alive(+1)
        try:
            yield self
        finally:
            self._keep_alive(-1)
            _current.reset(token)
            with self._lock:
                self._stage = None
                self._clear_status()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    # -- drawing -----------------------------------------------------------------------------

    def updated(self, phase: Phase) -> None:
        """``phase`` moved: redraw its bar, or a plain line when the last is old enough."""
        with self._lock:
            if phase.bar is not None:
                phase.bar.update(phase.n - phase.bar.n)  # drawn at most every 0.2 s
                self._last_output = time.perf_counter()
            elif not self.tty and self._due(time.perf_counter()):
                self._beat()

    def _due(self, now: float) -> bool:
        every = self.heartbeat_s if self.tty else self.plain_every_s
        return now - self._last_output >= every

    def _beat(self) -> None:
        """Show the innermost phase: refresh its bar, redraw the status line, or (not on a
        terminal) print a plain line."""
        phase = self._phases[-1] if self._phases else self._stage
        if phase is None:
            return
        if phase.bar is not None:
            phase.bar.refresh()  # tqdm recomputes the elapsed time and the estimate
            self._last_output = time.perf_counter()
            return
        outer = next((p for p in reversed(self._phases) if p.bar is not None), None)
        if outer is not None:  # a phase inside a bar: shown in the bar's note, not over it
            note = "; ".join(filter(None, (outer.postfix, phase.describe())))
            outer.bar.set_postfix_str(note, refresh=True)
            self._last_output = time.perf_counter()
            return
        text = f"[{self.prefix}{self.elapsed():6.1f}s] ... {phase.describe()}"
        if self.tty:
            if len(text) >= self.width:
                text = text[: self.width - 4] + "..."
            self._write(_CLEAR + text)
            self._status_shown = True
        else:
            self._write(text + "\n")

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write(_CLEAR)
            self._status_shown = False

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is not worth a crash
            pass
        self._last_output = time.perf_counter()

    # -- the heartbeat thread ----------------------------------------------------------------

    def _keep_alive(self, delta: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._alive += delta
            if self._alive > 0 and self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="graphopt-progress", daemon=True
                )
                self._thread.start()
            stopping = self._thread if self._alive == 0 else None
            if stopping is not None:
                self._thread = None
                self._stop.set()
        if stopping is not None and stopping is not threading.current_thread():
            stopping.join()

    def _run(self) -> None:
        while not self._stop.wait(_TICK_S):
            with self._lock:
                if not self._stop.is_set() and self._due(time.perf_counter()):
                    self._beat()


_DISABLED = Progress(False, tty=False)
_current: ContextVar[Progress] = ContextVar("graphopt_progress", default=_DISABLED)


def current() -> Progress:
    """The :class:`Progress` of the enclosing :meth:`Progress.active` block (``optimize``'s),
    else a disabled one."""
    return _current.get()


def _bar(owner: Progress, name: str, total: float, unit: str, leave: bool) -> Any:
    from tqdm import tqdm  # only on a terminal, with a known total

    return tqdm(
        total=total,
        desc=f"{owner.prefix}{name}",
        unit=unit or "it",
        file=owner.stream or sys.stderr,
        leave=leave,
        # a terminal that reports no size (a fresh pseudo-terminal) hides tqdm's bars
        dynamic_ncols=owner.sized,
        ncols=None if owner.sized else owner.width,
        nrows=None if owner.sized else 20,
        mininterval=0.2,
    )


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _columns(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s"

"""Dependencies' own log lines, kept off the terminal and summarized for the report.

TVM's C++ logger (``LOG(WARNING)``: "Scope Saving" once per memory scope of every library it
exports) and ONNX Runtime's write to file descriptor 2 directly, where Python's ``logging``
cannot reach them, and torch warns ``FutureWarning``s from inside TVM's import; a user can act
on none of them. :func:`quiet` wraps graphopt's own calls into those libraries: for its
duration fd 2 is a temporary file that a reader thread follows; the dependencies' log lines
(:data:`LOG_LINE`, with the indented lines that continue one) are kept, every other line
(graphopt's progress, the user's prints) is passed through to the real stderr as it arrives
(within 50 ms). Deprecation warnings raised by code outside graphopt
are kept too; other warnings are shown as usual when the block ends. Nothing blocks: the file
never fills the way a pipe does when the writer holds the GIL, and a child process that outlives
the block writes into the file, not into a closed pipe.

Every enclosing :func:`collecting` block receives the kept lines; :func:`summarize` turns them
into report notes, one per kind (library and source location): the count and the first example.

>>> with collecting() as lines:
...     with quiet():
...         executable.export_library("model.so")
>>> summarize(lines)
['TVM printed 4 warning lines (executable.cc:276), e.g. "Scope Saving:" (captured, not shown)']
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# TVM:  [17:55:39] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:
# ORT:  2026-12-06 17:57:12.904084156 [W:onnxruntime:, graph.cc:128 MergeShapeInfo] Error ...
LOG_LINE = re.compile(
    r"^\[\d\d:\d\d:\d\d\] (?P<tvm_where>\S+?\.(?:cc|h|cpp)):(?P<tvm_line>\d+): "
    r"(?:(?P<tvm_level>Warning|Info|Debug|Error): )?(?P<tvm_msg>.*)$"
    r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \[(?P<ort_level>[VIWEF]):onnxruntime:[^,\]]*,? ?"
    r"(?P<ort_where>[^\]]*)\] (?P<ort_msg>.*)$"
)
_ORT_LEVELS = {"V": "verbose", "I": "info", "W": "warning", "E": "error", "F": "fatal"}
_QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_GRAPHOPT = str(Path(__file__).resolve().parents[1])
_POLL_S = 0.05

_sinks: ContextVar[tuple[list[str], ...]] = ContextVar("graphopt_quiet_sinks", default=())
_lock = threading.RLock()  # fd 2 is one per process: one redirection at a time


def is_log_line(line: str) -> bool:
    """Whether ``line`` is a TVM or ONNX Runtime log line (colour codes ignored)."""
    return LOG_LINE.match(_ANSI.sub("", line).rstrip("\r\n")) is not None


@contextmanager
def collecting() -> Iterator[list[str]]:
    """Collect what every :func:`quiet` block inside this one keeps (this thread's context)."""
    lines: list[str] = []
    token = _sinks.set((*_sinks.get(), lines))
    try:
        yield lines
    finally:
        _sinks.reset(token)


@contextmanager
def quiet() -> Iterator[list[str]]:
    """Keep TVM's and ONNX Runtime's log lines (and dependencies' deprecation warnings) off
    stderr for the block; yields the list the kept lines are added to when the block ends."""
    kept: list[str] = []
    caught: list[warnings.WarningMessage] = []
    with _lock:
        try:
            with warnings.catch_warnings(record=True) as caught:
                follower = _Follower.start()
                try:
                    yield kept
                finally:
                    if follower is not None:
                        kept += follower.stop()
        finally:  # also when the block raised: the lines may explain it
            _sort_warnings(caught, kept)
            for sink in _sinks.get():
                sink.extend(kept)


def _sort_warnings(caught: list[warnings.WarningMessage], kept: list[str]) -> None:
    for w in caught:
        if issubclass(w.category, _QUIET_WARNINGS) and not w.filename.startswith(_GRAPHOPT):
            kept.append(f"{w.category.__name__}: {w.message} ({Path(w.filename).name})")
        else:  # not ours to hide: shown as it would have been
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def summarize(lines: list[str], limit: int = 8) -> list[str]:
    """One note per kind of line (library, level, source location): count and first example."""
    kinds: dict[tuple[str, str, str], list[str]] = {}
    for line in lines:
        kinds.setdefault(_kind(line), []).append(_message(line))
    notes = []
    for (library, level, where), messages in list(kinds.items())[:limit]:
        at = f" ({where})" if where else ""
        example = messages[0] if len(messages[0]) <= 160 else messages[0][:157] + "..."
        notes.append(
            f"{library} printed {len(messages)} {level} line{'s' * (len(messages) != 1)}{at}, "
            f'e.g. "{example}" (captured, not shown)'
        )
    if len(kinds) > limit:
        notes.append(f"... and {len(kinds) - limit} more kinds of dependency log lines")
    return notes


def _kind(line: str) -> tuple[str, str, str]:
    m = LOG_LINE.match(line)
    if m is None:  # a Python warning: "FutureWarning: ... (file.py)"
        category, _, rest = line.partition(": ")
        return "a dependency", category, rest.rsplit("(", 1)[-1].rstrip(")")
    if m["tvm_where"]:
        return (
            "TVM",
            (m["tvm_level"] or "log").lower(),
            f"{Path(m['tvm_where']).name}:{m['tvm_line']}",
        )
    return "ONNX Runtime", _ORT_LEVELS[m["ort_level"]], m["ort_where"].strip()


def _message(line: str) -> str:
    m = LOG_LINE.match(line)
    if m is None:
        return line.partition(": ")[2].rsplit(" (", 1)[0]
    return (m["tvm_msg"] if m["tvm_where"] else m["ort_msg"]).strip()


class _Follower:
    """fd 2 pointed at a temporary file; a thread follows the file and sorts its lines."""

    def __init__(self, saved: int, file: int) -> None:
        self.saved, self.file = saved, file
        self.pos, self.pending, self.kept = 0, b"", []
        self.continues = False  # the last line was a log line: indented lines belong to it
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="graphopt-quiet", daemon=True)

    @classmethod
    def start(cls) -> _Follower | None:
        _flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to keep off it
            return None
        with tempfile.TemporaryFile() as file:  # unlinked: gone with its last descriptor
            follower = cls(saved, os.dup(file.fileno()))
        os.dup2(follower.file, 2)
        follower.thread.start()
        return follower

    def stop(self) -> list[str]:
        _flush()
        os.dup2(self.saved, 2)
        self.done.set()
        self.thread.join()
        os.close(self.saved)
        os.close(self.file)
        return [_ANSI.sub("", line).rstrip("\r\n") for line in self.kept]

    def _follow(self) -> None:
        while not self.done.wait(_POLL_S):
            self._drain(final=False)
        self._drain(final=True)

    def _drain(self, final: bool) -> None:
        while chunk := os.pread(self.file, 1 << 16, self.pos):
            self.pos += len(chunk)
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for raw in lines:
            self._sort(raw + b"\n")
        # a partial line that cannot become a log line (a progress bar's "\r 40%") goes now
        if self.pending and (final or not _may_start_log(self.pending)):
            self._sort(self.pending)
            self.pending = b""

    def _sort(self, raw: bytes) -> None:
        text = raw.decode(errors="replace")
        if is_log_line(text):
            self.kept.append(text)
            self.continues = text.endswith("\n")
            return
        if self.continues and text[:1] in (" ", "\t"):  # a multi-line message's next line
            self.kept[-1] = self.kept[-1].rstrip("\r\n") + " " + text.strip() + "\n"
            return
        self.continues = False
        view = memoryview(raw)
        while view:
            view = view[os.write(self.saved, view) :]


def _may_start_log(partial: bytes) -> bool:
    """Whether a line's beginning could still be a log line (``[hh:...`` or a date, or colour)."""
    return partial[:1] in (b"[", b"\x1b") or partial[:1].isdigit()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, OSError, ValueError):  # closed or replaced streams
            stream.flush()

"""The ``graphopt`` command's entry point (and ``python -m graphopt``'s).

Importing the command loads torch, ONNX Runtime and onnx: 3 s on an idle 2-core machine, 10 s
and more on a busy one, before the command can say anything. So the import runs while a
ticker says it is loading (on a terminal after half a second, a line redrawn every second and
cleared when done; elsewhere a plain line every 10 s), and no phase of the command is silent.
Nothing is printed for ``--version``, ``--help`` and ``-q``/``--quiet``, or when the import is
quick. This module imports nothing of graphopt's until it has started the ticker.

The ticker is a forked child process where ``os.fork`` exists: an import holds the GIL for
seconds at a time (loading torch's extension modules), and a thread of this process could not
write then. Only the standard library is loaded and no other thread runs when it forks, so the
fork is safe; the child writes with ``os.write`` and leaves with ``os._exit`` (no buffers or
``atexit`` handlers of the parent's run twice), and ends when the pipe from the parent closes,
whether the parent closed it or died.
"""

from __future__ import annotations

import importlib
import os
import select
import signal
import sys
import threading
import time

QUIET = {"-q", "--quiet", "--version", "-h", "--help"}
_CLEAR = "\r\x1b[K"


def _tick(begin: float, tty: bool, stopped) -> bool:
    """Write the loading line until ``stopped(timeout)`` says to stop; whether a line was
    drawn. ``stopped`` waits up to ``timeout`` seconds and says whether the import is done."""
    # off a terminal (CI logs, pipes) the first line too waits 10 s, as Progress's plain
    # lines do: a command that fails fast still prints its one error line alone
    first, period = (0.5, 1.0) if tty else (10.0, 10.0)
    drawn = False
    while not stopped(period if drawn else first):
        elapsed = time.perf_counter() - begin
        line = f"[{elapsed:6.1f}s] loading graphopt (torch, ONNX Runtime)"
        os.write(2, ((_CLEAR + line) if tty else line + "\n").encode())
        drawn = True
    return drawn


class _Ticker:
    """The loading line, from a child process (or a thread where ``os.fork`` is missing)."""

    def __init__(self, begin: float) -> None:
        self.begin = begin
        self.tty = sys.stderr.isatty()
        self.drawn = False
        self.pid = 0
        self.pipe = -1
        self.thread: threading.Thread | None = None
        self.done = threading.Event()

    def start(self) -> None:
        sys.stderr.flush()
        if hasattr(os, "fork"):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: tick until the pipe says the parent is done
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
                os.close(write)
                code = 0
                try:
                    drawn = _tick(
                        self.begin, self.tty, lambda t: bool(select.select([read], [], [], t)[0])
                    )
                    code = 1 if drawn else 0
                finally:
                    os._exit(code)
            os.close(read)
            self.pid, self.pipe = pid, write
        else:
            self.thread = threading.Thread(target=self._thread, daemon=True)
            self.thread.start()

    def _thread(self) -> None:
        self.drawn = _tick(self.begin, self.tty, self.done.wait)

    def stop(self) -> None:
        if self.pid:
            os.close(self.pipe)  # the child's select returns: end of file
            _, status = os.waitpid(self.pid, 0)  # its last line is written before we clear it
            self.drawn = os.waitstatus_to_exitcode(status) == 1
        elif self.thread is not None:
            self.done.set()
            self.thread.join()
        if self.drawn and self.tty:
            sys.stderr.write(_CLEAR)
            sys.stderr.flush()


def main() -> int:
    """Import the command under a ticker, then run it."""
    quiet = bool(QUIET.intersection(sys.argv[1:]))
    if sys.stderr is None:  # started with 2>&-: progress and errors go nowhere, as asked
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the process's stderr until it exits
        quiet = True
    ticker = None if quiet else _Ticker(time.perf_counter())
    if ticker is not None:
        ticker.start()
    try:
        cli = importlib.import_module("graphopt.cli")  # seconds: torch, ONNX Runtime, onnx
    except KeyboardInterrupt:  # Ctrl-C while loading: the shell's status, as the command's
        return 130
    finally:
        if ticker is not None:
            ticker.stop()
    return cli.main()

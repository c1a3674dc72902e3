"""The ``graphopt`` command's entry point (and ``python -m graphopt``'s).

Importing the command loads torch, ONNX Runtime and onnx: 3 s on an idle 2-core machine, 10 s
and more on a busy one, before the command can say anything. So the import runs while a
ticker says it is loading (on a terminal after half a second, a line redrawn every second and
cleared when done; elsewhere a plain line every 10 s), and no phase of the command is silent.
Nothing is printed for ``--version``, ``--help`` and ``-q``/``--quiet``, or when the import is
quick. This module imports nothing of graphopt's until it has started the ticker.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time

QUIET = {"-q", "--quiet", "--version", "-h", "--help"}


class _Ticker(threading.Thread):
    def __init__(self, start: float) -> None:
        super().__init__(daemon=True)
        self.begin = start
        self.stopped = threading.Event()
        self.drawn = False
        self.tty = sys.stderr.isatty()

    def run(self) -> None:
        # off a terminal (CI logs, pipes) the first line too waits 10 s, as Progress's plain
        # lines do: a command that fails fast still prints its one error line alone
        first, period = (0.5, 1.0) if self.tty else (10.0, 10.0)
        while not self.stopped.wait(first if not self.drawn else period):
            elapsed = time.perf_counter() - self.begin
            line = f"[{elapsed:6.1f}s] loading graphopt (torch, ONNX Runtime)"
            sys.stderr.write(("\r\x1b[K" + line) if self.tty else line + "\n")
            sys.stderr.flush()
            self.drawn = True

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        if self.drawn and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def main() -> int:
    """Import the command under a ticker, then run it."""
    ticker = None if QUIET.intersection(sys.argv[1:]) else _Ticker(time.perf_counter())
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

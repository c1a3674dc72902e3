"""Progress lines for phases a user waits on."""

from __future__ import annotations

import sys
import time


class Progress:
    """Stage lines on stderr with the elapsed time, when enabled (the CLI's progress display)."""

    def __init__(self, enabled: bool, prefix: str = "") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(
                f"[{self.prefix}{time.perf_counter() - self.start:6.1f}s] {message}",
                file=sys.stderr,
                flush=True,
            )

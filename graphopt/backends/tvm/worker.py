"""Start-up helpers for TVM processes: MetaSchedule's builder workers and this process.

``tvm.s_tir.tensor_intrin`` parses ~250 TVMScript functions on import, and TVMScript's parser
calls ``inspect.stack()`` for each, whose source-file lookup walks ``sys.modules`` per frame:
26 s here (more with torch imported), paid by every builder worker before its first build, so
candidate builds hit MetaSchedule's 30 s timeout. :func:`fast_inspect` gives the parser the same
frames and source lines through ``linecache`` (3 s). This module imports nothing heavy, so a
worker that runs :func:`init_worker` does not import torch or the TVM backend's modules
(the package's ``__init__`` imports them lazily).
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import sys
from collections.abc import Iterator
from types import FrameType


def _frames(frame: FrameType | None) -> list[inspect.FrameInfo]:
    out = []
    while frame is not None:
        filename = frame.f_code.co_filename
        line = linecache.getline(filename, frame.f_lineno)
        out.append(
            inspect.FrameInfo(
                frame,
                filename,
                frame.f_lineno,
                frame.f_code.co_name,
                [line] if line else None,
                0 if line else None,
            )
        )
        frame = frame.f_back
    return out


@contextlib.contextmanager
def fast_inspect() -> Iterator[None]:
    """Within the block, ``inspect.stack``/``getouterframes`` skip the module search."""
    stack, outer = inspect.stack, inspect.getouterframes
    inspect.stack = lambda context=1: _frames(sys._getframe(1))  # type: ignore[assignment]
    inspect.getouterframes = lambda frame, context=1: _frames(frame)  # type: ignore[assignment]
    try:
        yield
    finally:
        inspect.stack, inspect.getouterframes = stack, outer


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (needed by MetaSchedule) the fast way, once."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with fast_inspect():
        import tvm.s_tir.tensor_intrin  # noqa: F401


CROSS_EXPORT = "graphopt.tvm.cross_export"


def init_worker(cross_cc: str | None = None) -> None:
    """Initializer of MetaSchedule's builder workers.

    ``cross_cc``: register :data:`CROSS_EXPORT`, which links candidates with that cross gcc.
    """
    import_tensor_intrinsics()
    if cross_cc:
        import os
        import tempfile

        import tvm
        from tvm.support import cc

        link = cc.cross_compiler(cross_cc)

        def export(mod: object) -> str:
            path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
            mod.export_library(path, fcompile=link)  # type: ignore[attr-defined]
            return path

        tvm.register_global_func(CROSS_EXPORT, export, override=True)

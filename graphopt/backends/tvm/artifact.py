"""What the TVM backend hands back: a Relax VM executable, run here or on an RPC device, saved
as a shared library that TVM's runtime alone can load."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from graphopt.backends.quiet import quiet
from graphopt.backends.tvm.lower import cross_compiler, is_cross
from graphopt.backends.tvm.rpc import RpcDevice, flatten_outputs, run_library
from graphopt.backends.tvm.summary import TaskInfo, TuningSummary
from graphopt.errors import BackendError


@dataclass
class TvmArtifact:
    """A compiled Relax VM executable: callable on numpy arrays, exportable as a ``.so``."""

    executable: Any
    target: tvm.target.Target
    input_shapes: list[tuple[int, ...]]
    tasks: list[TaskInfo]
    tuning: TuningSummary | None = None
    rpc: RpcDevice | None = None  # run and measure there
    imported_ops: Counter | None = None  # Relax ops of the imported model (ONNX loads)
    _vm: Any = None
    _dev: Any = None
    # the Artifact protocol: shapes are static by design (the backend says so, not the
    # artifact), and a library is no ORT mobile package
    static_shape_reason = None
    mobile_package = None

    @property
    def cross_compiled(self) -> bool:
        return is_cross(self.target)

    @property
    def heavy_untuned(self) -> list[str]:
        """Compute-heavy tasks running a schedule no measurement chose."""
        return [t.name for t in self.tasks if t.heavy and t.status != "tuned"]

    def _local_vm(self) -> tuple[Any, Any]:
        if self._vm is None:
            if self.cross_compiled:
                raise BackendError(
                    f"this artifact is compiled for {self.target.attrs.get('mtriple')} and "
                    "cannot run on this machine; give the backend an RPC device "
                    "(rpc='host:port/key') to run it there, or save('model.so') and copy it."
                )
            self._dev = tvm.cuda(0) if self.target.kind.name == "cuda" else tvm.cpu(0)
            self._vm = relax.VirtualMachine(self.executable, self._dev)
        return self._vm, self._dev

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.rpc is not None:
            with tempfile.TemporaryDirectory() as tmp:
                lib = self.save(Path(tmp) / "model.so")
                return run_library(lib, list(arrays), self.rpc)
        vm, dev = self._local_vm()
        if len(arrays) != len(self.input_shapes):
            raise BackendError(f"expected {len(self.input_shapes)} inputs, got {len(arrays)}.")
        for i, (a, want) in enumerate(zip(arrays, self.input_shapes, strict=True)):
            if tuple(a.shape) != tuple(want):
                raise BackendError(
                    f"input {i} has shape {list(a.shape)}; the TVM artifact was compiled for "
                    f"{list(want)} (shapes are static); optimize again with that shape."
                )
        args = [tvm.runtime.tensor(np.asarray(a, order="C"), device=dev) for a in arrays]
        try:
            out = vm["main"](*args)
        except Exception as exc:
            raise BackendError(f"the TVM VM failed to run the model: {exc}") from exc
        return flatten_outputs(out)  # the one flattener, shared with remote runs

    def save(self, path: str | Path) -> Path:
        """Write a shared library (weights embedded) that TVM's runtime alone can load."""
        path = Path(path)
        if path.suffix != ".so":
            raise BackendError(f"the TVM backend saves shared libraries: name it '*.so' ({path}).")
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if self.cross_compiled:
            kwargs["fcompile"] = cross_compiler(self.target)
        try:
            with quiet():  # TVM logs "Scope Saving" per memory scope
                self.executable.export_library(str(path), **kwargs)
        except Exception as exc:
            raise BackendError(f"exporting the TVM library failed: {exc}") from exc
        return path

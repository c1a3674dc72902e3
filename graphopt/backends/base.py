"""What every backend and every artifact offers: the ``Backend`` and ``Artifact`` protocols.

A backend lowers a rewritten graph (or an ONNX model) to its runtime and measures it; the
artifact it hands back runs on numpy arrays and saves to a file. The latency-aware passes
(through :class:`~graphopt.backends.measure.UnitTimer`) and the lowering's generic steps
(compile, check, bisect, save, report) use only these members; what is particular to one
backend (ONNX Runtime's session settings, TVM's tuning records) is read where that backend was
chosen. A new backend implements both and registers its name in
:data:`graphopt.backends.BACKENDS`.

The protocols import no backend (the concrete types of ``rpc`` and ``mobile_package`` are
named in their docstrings), so a pass may depend on them. Both are ``runtime_checkable``:
``isinstance(x, Backend)`` checks that every member exists (not their types). Members a backend
has no use for still exist with their neutral value (ONNX Runtime: ``rpc = None``,
``without_tuning()`` returns the backend itself; TVM artifacts: ``static_shape_reason = None``,
``mobile_package = None``), so callers read them directly, never through ``getattr``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx
    import torch

    from graphopt.backends.measure import Latency, LatencyCache
    from graphopt.target import Target


@runtime_checkable
class Artifact(Protocol):
    """A compiled model: callable on numpy arrays, savable."""

    @property
    def rpc(self) -> Any:
        """The remote device it runs on (a TVM ``RpcDevice``), or None: this machine."""

    @property
    def cross_compiled(self) -> bool:
        """Compiled for another machine (a phone, a board): it runs only through ``rpc``."""

    @property
    def static_shape_reason(self) -> str | None:
        """Why the shapes are fixed although dynamic axes were asked for (None: they are not,
        or none were asked for)."""

    @property
    def mobile_package(self) -> Any:
        """What ``save("*.ort")`` wrote for a phone (ONNX Runtime's ``MobilePackage``), else
        None."""

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs on one array per input, in order."""

    def save(self, path: str | Path) -> Path:
        """Write the deployable file (``.onnx`` / ``.ort``, ``.so``) and return its path."""


@runtime_checkable
class Backend(Protocol):
    """Lowers to a runtime for a target, runs, and measures."""

    name: str  # the registry name: "onnxruntime", "tvm"

    @property
    def version(self) -> str:
        """The runtime's version (part of every latency cache key)."""

    @property
    def target(self) -> Target:
        """Where the artifacts run."""

    @property
    def threads(self) -> int:
        """The CPU threads a run uses (for the report)."""

    @property
    def cache(self) -> LatencyCache | None:
        """The latency cache ``measure`` uses (None: the default one on disk)."""

    @property
    def rpc(self) -> Any:
        """The remote device that runs and times the artifacts (a TVM ``RpcDevice``), or None:
        this machine."""

    def settings(self) -> dict[str, Any]:
        """The settings a measurement depends on (part of every latency cache key)."""

    def compile(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
        output_axes: Mapping[str, Mapping[int, str]] | None = None,
    ) -> Artifact:
        """Lower ``module`` (a GraphModule or any ``nn.Module``) for ``example_inputs``;
        ``dynamic_axes`` / ``output_axes`` (``{name: {axis: dim name}}``; None: the batch) stay
        symbolic where the backend compiles dynamic shapes."""

    def load(self, proto: onnx.ModelProto, input_shapes: Any = None) -> Artifact:
        """Lower an ONNX model (``input_shapes``: one static shape per input, where the
        backend compiles static shapes)."""

    def measure(
        self,
        model: Any,
        inputs: Sequence[Any],
        *,
        warmup: int = 5,
        runs: int = 50,
        max_time_s: float = 10.0,
        use_cache: bool = True,
    ) -> Latency:
        """Latency of one call of ``model`` (an artifact, a module, for ONNX Runtime an ONNX
        model) on ``inputs``, cached on disk unless ``use_cache=False``."""

    def without_tuning(self) -> Backend:
        """A backend that lowers as this one does but never tunes (for probes such as the
        bisection of a disagreeing artifact)."""

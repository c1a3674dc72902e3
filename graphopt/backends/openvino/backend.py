"""OpenVINO backend: FX -> ONNX -> ``openvino.Core().compile_model``; run, save, measure.

The graph is exported by :func:`graphopt.backends.export.export_onnx`, as for ONNX Runtime;
OpenVINO reads that ONNX model (or int8's QDQ model, whose Quantize/DequantizeLinear pairs its
low-precision transformations turn into int8 kernels) and compiles it for the target's device
(:func:`~graphopt.backends.openvino.config.device_for`) with the backend's performance hint,
threads and f32 inference precision. Dynamic axes stay dynamic (OpenVINO compiles partial
shapes); a valid model that cannot keep them is compiled at the example's shapes, and
``OpenVinoArtifact.static_shape_reason`` says why.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import openvino as ov
import torch

from graphopt._util import close_matches, first_line
from graphopt.backends.arrays import to_numpy
from graphopt.backends.exported import compile_exported
from graphopt.backends.measure import (
    Latency,
    LatencyCache,
    available_cores,
    cache_key,
    cached_latency,
    time_callable,
)
from graphopt.backends.openvino.artifact import OpenVinoArtifact
from graphopt.backends.openvino.config import (
    SETTING_NAMES,
    check_hint,
    compile_config,
    device_for,
)
from graphopt.backends.quiet import quiet
from graphopt.errors import BackendError
from graphopt.target import Target

log = logging.getLogger(__name__)


class OpenVinoBackend:
    """Lower to OpenVINO on the target's device, run, and measure.

    ``threads``: ``INFERENCE_NUM_THREADS`` (default: every available core); ``hint``: the
    performance hint (``"latency"``, ``"throughput"``, ``"cumulative_throughput"``).

    >>> backend = OpenVinoBackend("cpu")
    >>> artifact = backend.compile(gm, (x,))
    >>> backend.measure(artifact, (x,)).median_ms
    """

    name = "openvino"
    rpc = None  # the Backend protocol: OpenVINO runs and measures on this machine

    def __init__(
        self,
        target: Target | str = "cpu",
        *,
        threads: int | None = None,
        hint: str = "latency",
        cache: LatencyCache | None = None,
    ) -> None:
        self.target = Target.parse(target)
        self.device = device_for(self.target)
        self.threads = threads or available_cores()
        if self.threads < 1:
            raise BackendError(f"threads must be 1 or more, not {self.threads}.")
        self.hint = check_hint(hint)
        self.cache = cache
        self.core = ov.Core()

    @property
    def version(self) -> str:
        return ov.__version__

    def settings(self) -> dict[str, Any]:
        """The compile settings (part of the latency cache key) and the device."""
        return {"threads": self.threads, "hint": self.hint, "device": self.device}

    def with_settings(self, **settings: Any) -> OpenVinoBackend:
        """A copy of this backend with some settings replaced (``threads``, ``hint``)."""
        for name in settings:
            if name not in SETTING_NAMES:
                raise BackendError(
                    f"unknown OpenVINO setting {name!r}."
                    + close_matches(name, SETTING_NAMES)
                    + f" Settings: {', '.join(SETTING_NAMES)}."
                )
        current = {name: getattr(self, name) for name in SETTING_NAMES}
        return OpenVinoBackend(self.target, cache=self.cache, **{**current, **settings})

    def without_tuning(self) -> OpenVinoBackend:
        """This backend: OpenVINO has nothing to tune (the Backend protocol)."""
        return self

    def load(self, proto: onnx.ModelProto, input_shapes: Any = None) -> OpenVinoArtifact:
        """Compile an ONNX model (``input_shapes``: unused, OpenVINO takes the model's own,
        dynamic axes included)."""
        try:
            with quiet():  # OpenVINO's deprecation warnings and log lines go to the report
                model = self.core.read_model(proto.SerializeToString())
                compiled = self.core.compile_model(
                    model, self.device, compile_config(self.threads, self.hint)
                )
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types
            raise BackendError(f"OpenVINO could not compile the model: {first_line(exc)}") from exc
        return OpenVinoArtifact(proto, model, compiled, self.target)

    def compile(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
        output_axes: Mapping[str, Mapping[int, str]] | None = None,
    ) -> OpenVinoArtifact:
        """Export ``module`` and compile it.

        ``dynamic_axes`` stay symbolic (None: the batch; ``{}``: a static model, see
        :func:`~graphopt.backends.export.export_onnx`). A valid model that cannot be exported,
        compiled or run on its example that way is exported again with the example's shapes,
        and ``artifact.static_shape_reason`` says why; only when both fail is it a
        ``BackendError``, which gives both reasons.
        """
        return compile_exported(
            self.load,
            module,
            example_inputs,
            runtime="OpenVINO",
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            output_axes=output_axes,
        )

    def measure(
        self,
        model: OpenVinoArtifact | onnx.ModelProto | torch.nn.Module,
        inputs: Sequence[Any],
        *,
        warmup: int = 5,
        runs: int = 50,
        max_time_s: float = 10.0,
        use_cache: bool = True,
    ) -> Latency:
        """Median latency of one call of ``model`` on ``inputs`` (cached on disk by default).

        The key is the ONNX model's bytes hash, the target, OpenVINO's version, the settings and
        the input shapes: a second measurement of the same model is free.
        """
        arrays = [to_numpy(x) for x in inputs]
        if isinstance(model, torch.nn.Module):
            model = self.compile(model, [torch.from_numpy(a) for a in arrays])
        artifact = model if isinstance(model, OpenVinoArtifact) else self.load(model)
        key = cache_key(
            model=hashlib.blake2b(artifact.proto.SerializeToString(), digest_size=16).hexdigest(),
            target=str(self.target),
            backend=self.name,
            version=self.version,
            settings=self.settings(),
            shapes=[(a.shape, str(a.dtype)) for a in arrays],
            runs=runs,
            warmup=warmup,
        )
        return cached_latency(
            key,
            lambda: time_callable(
                lambda: artifact.run(arrays), warmup=warmup, runs=runs, max_time_s=max_time_s
            ),
            self.cache,
            use_cache,
        )

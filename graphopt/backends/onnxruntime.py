"""ONNX Runtime backend: FX -> ONNX -> ``InferenceSession``; run, save, measure.

Export uses torch's TorchScript-based exporter (``dynamo=False``): on the zoo models it is ~15x
faster than the dynamo exporter (0.15 s against 2.5 s on a small CNN here), handles FX graphs
with arbitrary ``call_function`` nodes, and keeps the batch dimension dynamic through
``dynamic_axes``. Where it fails the dynamo exporter is tried. Sessions use full graph
optimization, sequential execution and one intra-op thread per available core by default;
``OnnxRuntimeBackend.select_settings`` times a few alternatives against each other and
``with_settings`` applies the winner.

A mobile target (``android-arm64``, ``aarch64``, ``llvm -mtriple=aarch64...``) is served for
verification: sessions run on this machine's CPU provider so the numbers can be checked, the
artifact saves in ORT format for the phone (``.ort``, see :mod:`graphopt.backends.ort_mobile`),
and ``measure`` refuses, since a phone's latency cannot be measured from here.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from graphopt import verify
from graphopt.backends.measure import (
    Latency,
    LatencyCache,
    available_cores,
    cache_key,
    cached_latency,
    time_callable,
    time_interleaved,
)
from graphopt.errors import BackendError, InputError, close_matches
from graphopt.target import Target

log = logging.getLogger(__name__)

OPSET = 17
MAX_IR_VERSION = 10  # ONNX Runtime 1.31 rejects IR 14, which onnx 1.23 stamps by default

_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

_OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_EXEC_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
SETTING_NAMES = ("threads", "optimization_level", "execution_mode", "inter_op_threads")


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Export ``module`` to an ONNX ``ModelProto`` with (by default) a dynamic batch axis."""
    inputs = tuple(example_inputs)
    names = [
        f"input{i}" if input_names is None else _clean(input_names[i]) for i in range(len(inputs))
    ]
    with torch.no_grad():
        outputs = verify.flatten_outputs(module(*inputs))
    out_names = [f"output{i}" for i in range(len(outputs))]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n, t in zip(names, inputs, strict=True) if t.dim() > 0}
        dynamic_axes.update(
            {n: {0: "batch"} for n, t in zip(out_names, outputs, strict=True) if t.dim() > 0}
        )
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=out_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        proto = onnx.load_from_string(buffer.getvalue())
    except Exception as legacy_exc:  # noqa: BLE001 - fall back on the other exporter
        log.info("TorchScript exporter failed (%s); trying the dynamo exporter", legacy_exc)
        proto = _export_dynamo(module, inputs, names, out_names, dynamic_batch, opset, legacy_exc)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


def _export_dynamo(module, inputs, names, out_names, dynamic_batch, opset, legacy_exc):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                opset_version=max(opset, 18),
                input_names=list(names),
                output_names=list(out_names),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        return program.model_proto
    except Exception as exc:
        raise BackendError(
            f"could not export the graph to ONNX: the TorchScript exporter said "
            f"{type(legacy_exc).__name__}: {str(legacy_exc).splitlines()[0]}; the "
            f"dynamo exporter said {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}."
        ) from exc


def _clean(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "input"


@dataclass
class OrtArtifact:
    """An ONNX model with its session: callable on numpy arrays, savable.

    ``target``: where the model is meant to run; for a mobile target the session here only
    checks numbers, and ``save`` writes ORT format for a ``.ort`` path.
    """

    proto: onnx.ModelProto
    session: ort.InferenceSession
    target: Target | None = None
    mobile_package: Any = None  # set by save("*.ort"): a MobilePackage

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {}
        for meta, array in zip(self.session.get_inputs(), arrays, strict=True):
            dtype = _NP_DTYPES.get(meta.type)
            feeds[meta.name] = np.ascontiguousarray(array, dtype=dtype)
        try:
            return self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime failed to run the model: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the model: ORT format for a ``.ort`` path, ONNX otherwise.

        The ORT file gets its operator config and XNNPACK session file beside it; the
        :class:`~graphopt.backends.ort_mobile.MobilePackage` is kept as ``mobile_package`` (its
        ``describe()`` lists the operators a reduced mobile build must include); use
        :func:`graphopt.backends.ort_mobile.save_ort_format` for the converter's options.
        """
        path = Path(path)
        if path.suffix.lower() == ".ort":
            from graphopt.backends.ort_mobile import save_ort_format

            mobile = self.target is None or self.target.device == "mobile"
            self.mobile_package = save_ort_format(
                self.proto, path, target_platform="arm" if mobile else "amd64"
            )
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.proto, str(path))
        return path


@dataclass
class SettingsChoice:
    """The fastest of several session settings, and every candidate's interleaved timing.

    ``best`` can be passed to ``OnnxRuntimeBackend.with_settings(**best)``.
    """

    best: dict[str, Any]
    timings: dict[str, Latency]
    label: str = ""  # best's key in timings
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> settings

    def __str__(self) -> str:
        rows = [
            f"{'*' if k == self.label else ' '} {k:<36} {t}"
            for k, t in sorted(self.timings.items(), key=lambda kv: kv[1].median_ms)
        ]
        return "\n".join(rows)


class OnnxRuntimeBackend:
    """Lower to ONNX Runtime on the target's execution provider, run, and measure.

    >>> backend = OnnxRuntimeBackend(Target.parse("cpu"))
    >>> artifact = backend.compile(gm, (x,))
    >>> backend.measure(artifact, (x,)).median_ms
    """

    name = "onnxruntime"

    def __init__(
        self,
        target: Target | str = "cpu",
        *,
        threads: int | None = None,
        optimization_level: str = "all",
        execution_mode: str = "sequential",
        inter_op_threads: int = 1,
        cache: LatencyCache | None = None,
    ) -> None:
        self.target = Target.parse(target)
        self.threads = threads or available_cores()
        self.optimization_level = _choose("optimization_level", optimization_level, _OPT_LEVELS)
        self.execution_mode = _choose("execution_mode", execution_mode, _EXEC_MODES)
        if self.threads < 1 or inter_op_threads < 1:
            raise BackendError(
                f"threads and inter_op_threads must be 1 or more, not {self.threads} and "
                f"{inter_op_threads}."
            )
        self.inter_op_threads = inter_op_threads
        self.cache = cache
        self.providers = self._providers()

    @property
    def version(self) -> str:
        return ort.__version__

    def settings(self) -> dict[str, Any]:
        """The session settings (part of the latency cache key) and the providers."""
        return {
            "threads": self.threads,
            "optimization_level": self.optimization_level,
            "providers": self.providers,
            "execution_mode": self.execution_mode,
            "inter_op_threads": self.inter_op_threads,
        }

    def with_settings(self, **settings: Any) -> OnnxRuntimeBackend:
        """A copy of this backend with some session settings replaced (``SETTING_NAMES``)."""
        for name in settings:
            if name not in SETTING_NAMES:
                raise BackendError(
                    f"unknown session setting {name!r}."
                    + close_matches(name, SETTING_NAMES)
                    + f" Settings: {', '.join(SETTING_NAMES)}."
                )
        current = {name: getattr(self, name) for name in SETTING_NAMES}
        return OnnxRuntimeBackend(self.target, cache=self.cache, **{**current, **settings})

    def _providers(self) -> list[str]:
        available = ort.get_available_providers()
        if self.target.device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError(
                    "target 'cuda' needs ONNX Runtime's CUDA provider, which this "
                    "onnxruntime build lacks (it has "
                    f"{', '.join(available)}); install onnxruntime-gpu on a "
                    "machine with an NVIDIA GPU, or use target 'cpu'."
                )
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # a mobile target runs here on the CPU provider, to check numbers only (see measure)
        return ["CPUExecutionProvider"]

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = _OPT_LEVELS[self.optimization_level]
        opts.execution_mode = _EXEC_MODES[self.execution_mode]
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.log_severity_level = 3
        # worker threads stop spinning at the end of each run: graphopt times several sessions
        # in alternation in one process, and a session left spinning takes the cores from the
        # next (MobileNetV2, three identical sessions interleaved on 2 cores: median 8.7-10.7
        # ms, p90 16 ms; with this 4.3-4.7 ms, as one session alone: 4.0 ms either way)
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        return opts

    def load(self, proto: onnx.ModelProto, input_shapes: Any = None) -> OrtArtifact:
        """Build a session for an ONNX model (``input_shapes``: unused, ONNX Runtime takes the
        model's own, dynamic batch included)."""
        try:
            session = ort.InferenceSession(
                proto.SerializeToString(), self.session_options(), providers=self.providers
            )
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime could not load the model: {str(exc).splitlines()[0]}"
            ) from exc
        return OrtArtifact(proto, session, self.target)

    def compile(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        dynamic_batch: bool = True,
    ) -> OrtArtifact:
        """Export ``module`` and build its session."""
        proto = export_onnx(
            module, example_inputs, input_names=input_names, dynamic_batch=dynamic_batch
        )
        return self.load(proto)

    def measure(
        self,
        model: OrtArtifact | onnx.ModelProto | torch.nn.Module,
        inputs: Sequence[Any],
        *,
        warmup: int = 5,
        runs: int = 50,
        max_time_s: float = 10.0,
        use_cache: bool = True,
    ) -> Latency:
        """Median latency of one call of ``model`` on ``inputs`` (cached on disk by default).

        The key is the ONNX model's bytes hash, the target, ONNX Runtime's version, the
        session settings and the input shapes: a second measurement of the same model is free.
        A mobile target raises ``BackendError``: its latency cannot be measured from here.
        """
        self._refuse_mobile_timing()
        arrays = [to_numpy(x) for x in inputs]
        if isinstance(model, torch.nn.Module):
            model = self.compile(model, [torch.from_numpy(a) for a in arrays])
        artifact = model if isinstance(model, OrtArtifact) else self.load(model)
        key = cache_key(
            model=_proto_hash(artifact.proto),
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

    def candidate_settings(self) -> list[dict[str, Any]]:
        """The default candidates of ``select_settings`` (at most 5).

        Intra-op threads 1 and all cores, each at optimization level "all" and "extended",
        sequential; and one parallel run with 2 inter-op threads sharing the cores.
        """
        cores = available_cores()
        candidates = []
        for level in ("all", "extended"):
            for threads in dict.fromkeys((1, cores)):  # deduped when there is one core
                candidates.append(
                    {
                        "threads": threads,
                        "optimization_level": level,
                        "execution_mode": "sequential",
                        "inter_op_threads": 1,
                    }
                )
        if cores >= 2:  # with one core a second inter-op thread can only oversubscribe it
            candidates.append(
                {
                    "threads": max(1, cores // 2),
                    "optimization_level": "all",
                    "execution_mode": "parallel",
                    "inter_op_threads": 2,
                }
            )
        return candidates

    def select_settings(
        self,
        proto_or_artifact: OrtArtifact | onnx.ModelProto,
        inputs: Sequence[Any],
        *,
        candidates: Sequence[Mapping[str, Any]] | None = None,
        runs: int = 20,
        warmup: int = 3,
        max_time_s: float = 20.0,
    ) -> SettingsChoice:
        """Time the model under each candidate session setting, interleaved; pick the fastest.

        ``candidates``: dicts of ``SETTING_NAMES`` overrides, default ``candidate_settings()``.
        All sessions are timed in one ``time_interleaved`` run (each timed call re-warmed), so
        load drift hits them alike; the lowest median wins. Nothing global changes: apply the
        choice with ``backend.with_settings(**choice.best)``.
        """
        self._refuse_mobile_timing()
        proto = (
            proto_or_artifact.proto
            if isinstance(proto_or_artifact, OrtArtifact)
            else proto_or_artifact
        )
        arrays = [to_numpy(x) for x in inputs]
        current = {name: getattr(self, name) for name in SETTING_NAMES}
        if candidates is None:
            candidates = self.candidate_settings()
        chosen = [{**current, **c} for c in candidates]
        if not chosen:
            raise BackendError("select_settings needs at least one candidate setting.")
        labelled = {_settings_label(c): c for c in chosen}  # same label, same settings
        artifacts = {label: self.with_settings(**c).load(proto) for label, c in labelled.items()}
        timings = time_interleaved(
            {label: (lambda a=a: a.run(arrays)) for label, a in artifacts.items()},
            warmup=warmup,
            runs=runs,
            max_time_s=max_time_s,
            rewarm=2,
        )
        best = min(timings, key=lambda label: timings[label].median_ms)
        log.info("session settings: %s wins (%s)", best, timings[best])
        return SettingsChoice(dict(labelled[best]), timings, best, labelled)

    def _refuse_mobile_timing(self) -> None:
        if self.target.device == "mobile":
            raise BackendError(
                f"target {self.target} is a phone/board: its latency can't be measured from "
                "here (this backend runs the model on this machine's CPU only to check its "
                "numbers). Use the TVM backend with an RPC device to time it on the device, or "
                "measure with target 'cpu' for this machine."
            )


def _proto_hash(proto: onnx.ModelProto) -> str:
    import hashlib

    return hashlib.blake2b(proto.SerializeToString(), digest_size=16).hexdigest()


def _settings_label(settings: Mapping[str, Any]) -> str:
    mode = settings["execution_mode"]
    if mode == "parallel":
        mode = f"parallel(inter={settings['inter_op_threads']})"
    return f"threads={settings['threads']} {mode} {settings['optimization_level']}"


def _choose(name: str, value: str, choices: Mapping[str, Any]) -> str:
    if value not in choices:
        raise BackendError(
            f"{name} must be one of {', '.join(choices)}, not {value!r}."
            + close_matches(str(value), choices)
        )
    return value


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InputError(f"inputs must be torch tensors or numpy arrays, not {type(x).__name__}.")

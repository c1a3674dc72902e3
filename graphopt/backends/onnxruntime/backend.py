"""ONNX Runtime backend: FX -> ONNX -> ``InferenceSession``; run, save, measure.

The graph is exported by :func:`graphopt.backends.export.export_onnx`. A valid model whose
dynamic axes cannot stay symbolic is compiled at the example's shapes, and
``OrtArtifact.static_shape_reason`` says why. Sessions use full graph
optimization, sequential execution and one intra-op thread per available core by default;
``OnnxRuntimeBackend.select_settings`` times a few alternatives against each other and
``with_settings`` applies the winner.

A mobile target (``android-arm64``, ``aarch64``, ``llvm -mtriple=aarch64...``) is served for
verification: sessions run on this machine's CPU provider so the numbers can be checked, the
artifact saves in ORT format for the phone (``.ort``, see
:mod:`graphopt.backends.onnxruntime.mobile`), and ``measure`` refuses, since a phone's latency
cannot be measured from here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnxruntime as ort
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
    time_interleaved,
)
from graphopt.backends.onnxruntime.artifact import OrtArtifact
from graphopt.backends.onnxruntime.session import (
    EXEC_MODES,
    OPT_LEVELS,
    SETTING_NAMES,
    choose,
    session_options,
)
from graphopt.backends.quiet import quiet
from graphopt.errors import BackendError
from graphopt.target import Target

log = logging.getLogger(__name__)


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
    rpc = None  # the Backend protocol: ONNX Runtime runs and measures on this machine

    def __init__(
        self,
        target: Target | str = "cpu",
        *,
        threads: int | None = None,
        optimization_level: str = "all",
        execution_mode: str = "sequential",
        inter_op_threads: int = 1,
        spinning: bool = True,
        cache: LatencyCache | None = None,
    ) -> None:
        self.target = Target.parse(target)
        self.threads = threads or available_cores()
        self.optimization_level = choose("optimization_level", optimization_level, OPT_LEVELS)
        self.execution_mode = choose("execution_mode", execution_mode, EXEC_MODES)
        if self.threads < 1 or inter_op_threads < 1:
            raise BackendError(
                f"threads and inter_op_threads must be 1 or more, not {self.threads} and "
                f"{inter_op_threads}."
            )
        self.inter_op_threads = inter_op_threads
        self.spinning = bool(spinning)
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
            "spinning": self.spinning,
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

    def without_tuning(self) -> OnnxRuntimeBackend:
        """This backend: ONNX Runtime has nothing to tune (the Backend protocol)."""
        return self

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
        opts = session_options(self.optimization_level, self.threads)
        opts.execution_mode = EXEC_MODES[self.execution_mode]
        opts.inter_op_num_threads = self.inter_op_threads
        # worker threads stop spinning at the end of each run: graphopt times several sessions
        # in alternation in one process, and a session left spinning takes the cores from the
        # next (MobileNetV2, three identical sessions interleaved on 2 cores: median 8.7-10.7
        # ms, p90 16 ms; with this 4.3-4.7 ms, as one session alone: 4.0 ms either way)
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        if not self.spinning:  # workers block instead of spinning while they wait for work: on a
            # loaded machine MobileNetV2 ran 8.3 ms against 15.8 ms spinning (issue 19)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return opts

    def load(self, proto: onnx.ModelProto, input_shapes: Any = None) -> OrtArtifact:
        """Build a session for an ONNX model (``input_shapes``: unused, ONNX Runtime takes the
        model's own, dynamic batch included)."""
        try:
            with quiet():  # ONNX Runtime's own logger writes to fd 2
                session = ort.InferenceSession(
                    proto.SerializeToString(), self.session_options(), providers=self.providers
                )
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not load the model: {first_line(exc)}") from exc
        return OrtArtifact(proto, session, self.target)

    def compile(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
        output_axes: Mapping[str, Mapping[int, str]] | None = None,
    ) -> OrtArtifact:
        """Export ``module`` and build its session.

        ``dynamic_axes`` stay symbolic (None: the batch; ``{}``: a static model, see
        :func:`~graphopt.backends.export.export_onnx`). A valid model that cannot be
        exported, loaded or run on its example that way (a model whose code fixes the batch, a
        split of a 1-D input along its only axis...) is exported again with the example's
        shapes, and ``artifact.static_shape_reason`` says why. Only when both fail is it a
        ``BackendError``, which gives both reasons.
        """
        return compile_exported(
            self.load,
            module,
            example_inputs,
            runtime="ONNX Runtime",
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            output_axes=output_axes,
        )

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
        """The default candidates of ``select_settings`` (at most 6).

        Intra-op threads 1 and all cores, each at optimization level "all" and "extended",
        sequential; all cores at level "all" with workers that do not spin (they block while
        waiting: faster where other processes want the cores); and one parallel run with 2
        inter-op threads sharing the cores.
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
                        "spinning": True,
                    }
                )
        if cores >= 2:  # with one core a second inter-op thread can only oversubscribe it
            candidates.append({**candidates[1], "spinning": False})  # all cores, level "all"
            candidates.append(
                {
                    "threads": max(1, cores // 2),
                    "optimization_level": "all",
                    "execution_mode": "parallel",
                    "inter_op_threads": 2,
                    "spinning": True,
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
        labelled = {settings_label(c): c for c in chosen}  # same label, same settings
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
    return hashlib.blake2b(proto.SerializeToString(), digest_size=16).hexdigest()


def settings_label(settings: Mapping[str, Any]) -> str:
    """A session setting in words: "threads=2 sequential all", "... no-spin" when not spinning."""
    mode = settings["execution_mode"]
    if mode == "parallel":
        mode = f"parallel(inter={settings['inter_op_threads']})"
    spin = "" if settings.get("spinning", True) else " no-spin"
    return f"threads={settings['threads']} {mode} {settings['optimization_level']}{spin}"

"""TVM backend: FX graph -> Relax -> MetaSchedule-tuned library, run with the Relax VM.

The steps live beside this module: :mod:`~graphopt.backends.tvm.lower` (targets, import into
Relax, fusion, the final lowering), :mod:`~graphopt.backends.tvm.tuner` (MetaSchedule under a
budget in trials and/or minutes), :mod:`~graphopt.backends.tvm.database` (the records on disk,
one database per target, reused by every model), :mod:`~graphopt.backends.tvm.schedule` (records
applied, defaults for the rest, every task classified) and
:mod:`~graphopt.backends.tvm.artifact` (the executable, run and exported as a ``.so``). Mobile
targets cross-compile and are run, measured and tuned on a device through an RPC tracker
(:mod:`graphopt.backends.tvm.rpc`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
import tvm

from graphopt._util import cache_dir, first_line
from graphopt.backends.arrays import to_numpy
from graphopt.backends.measure import (
    Latency,
    LatencyCache,
    cache_key,
    cached_latency,
    time_callable,
)
from graphopt.backends.quiet import quiet
from graphopt.backends.tvm.artifact import TvmArtifact
from graphopt.backends.tvm.database import TuningDatabase
from graphopt.backends.tvm.lower import (
    fold_shapes,
    fuse,
    lower_pipeline,
    onnx_inputs,
    op_counts,
    relax_from_proto,
    target_json,
    to_relax,
    tvm_target,
)
from graphopt.backends.tvm.rpc import RpcDevice, measure_library
from graphopt.backends.tvm.schedule import schedule
from graphopt.backends.tvm.summary import TuningSummary
from graphopt.backends.tvm.tuner import Tuner
from graphopt.errors import BackendError
from graphopt.target import Target

log = logging.getLogger(__name__)


class TvmBackend:
    """Lower to TVM for the target, tune with MetaSchedule, run, measure, export.

    ``trials`` / ``minutes``: the tuning budget (0 / None: no tuning; records already in the
    database are applied either way). ``database``: the database directory (default: one per
    target under the cache directory). ``rpc``: an :class:`~graphopt.backends.tvm.rpc.RpcDevice`
    or ``"host:port/key"``: tune, run and measure on that device.

    >>> backend = TvmBackend(Target.parse("cpu"), trials=200)
    >>> artifact = backend.compile(gm, (x,))
    >>> backend.measure(artifact, (x,)).median_ms
    """

    name = "tvm"

    def __init__(
        self,
        target: Target | str = "cpu",
        *,
        trials: int = 0,
        minutes: float | None = None,
        database: str | Path | None = None,
        rpc: RpcDevice | str | None = None,
        progress: bool = False,
        seed: int = 0,
        cache: LatencyCache | None = None,
        cores: int | None = None,
    ) -> None:
        self.target = Target.parse(target)
        if trials < 0 or (minutes is not None and minutes <= 0):
            raise BackendError("the tuning budget must be trials >= 0 and minutes > 0.")
        self.trials = int(trials)
        self.minutes = minutes
        if self.minutes is not None and not self.trials:
            self.trials = 100_000  # bounded by time alone
        self.rpc = RpcDevice.parse(rpc) if isinstance(rpc, str) else rpc
        self.progress = progress
        self.seed = seed
        self.cache = cache
        self.tvm_target = tvm_target(self.target, cores)
        if self.target.device == "cuda" and not tvm.cuda(self.target.index).exist:
            raise BackendError(
                "target 'cuda' with the TVM backend needs an NVIDIA GPU and a CUDA-enabled TVM "
                "build; none is visible here. Use target 'cpu'."
            )
        if self.target.device == "mobile" and (self.trials or self.minutes) and self.rpc is None:
            raise BackendError(
                f"tuning for {self.target} measures on the device: pass rpc='host:9190/key' "
                "with a phone or board registered at an RPC tracker (see the README)."
            )
        self.database_path = Path(database) if database else self._default_database()
        self.threads = int(self.tvm_target.attrs.get("num-cores", 0) or 0)

    @property
    def version(self) -> str:
        return tvm.__version__

    def expected_trials(self) -> int:
        """The trials the budget allows (see :meth:`Tuner.expected_trials`)."""
        return self._tuner().expected_trials()

    def without_tuning(self) -> TvmBackend:
        """A copy that applies the database but never tunes (for probes such as bisection)."""
        quiet = copy.copy(self)
        quiet.trials, quiet.minutes, quiet.progress = 0, None, False
        return quiet

    def settings(self) -> dict[str, Any]:
        return {"target": target_json(self.tvm_target), "rpc": self.rpc and self.rpc.describe()}

    def _default_database(self) -> Path:
        digest = hashlib.blake2b(
            (target_json(self.tvm_target) + tvm.__version__).encode(), digest_size=8
        ).hexdigest()
        return cache_dir() / "tvm" / f"db-{digest}"

    # ---- lowering

    def compile(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        **_: Any,
    ) -> TvmArtifact:
        """Import, tune within the budget, apply the database, schedule the rest, build."""
        with quiet():  # torch's FutureWarnings from inside torch.export
            mod = to_relax(module, example_inputs, input_names=input_names)
        return self.compile_relax(mod, [tuple(x.shape) for x in example_inputs])

    def load(
        self, proto: onnx.ModelProto, input_shapes: Sequence[tuple[int, ...]] | None = None
    ) -> TvmArtifact:
        """Compile an ONNX model (e.g. the int8 QDQ model) for ``input_shapes`` (TVM compiles
        static shapes: required)."""
        if input_shapes is None:
            raise BackendError("the TVM backend compiles static shapes: pass input_shapes.")
        if len(names := onnx_inputs(proto)) != len(input_shapes):
            raise BackendError(
                f"the ONNX model takes {len(names)} input(s) {names}, but {len(input_shapes)} "
                "input shape(s) were given: give one static shape per model input, in order."
            )
        try:
            with quiet():
                mod = relax_from_proto(proto, input_shapes)
        except Exception as exc:
            first = first_line(exc, with_type=True)
            try:  # shape arithmetic TVM's importer rejects, folded away at the static shapes
                with quiet():
                    mod = relax_from_proto(fold_shapes(proto, input_shapes), input_shapes)
            except Exception as again:
                raise BackendError(
                    f"TVM could not import the ONNX model ({first}; with its shape arithmetic "
                    f"folded: {first_line(again, with_type=True)}). Use backend='onnxruntime'."
                ) from again
        artifact = self.compile_relax(mod, [tuple(s) for s in input_shapes])
        artifact.imported_ops = op_counts(mod)
        return artifact

    def compile_relax(self, mod: tvm.IRModule, input_shapes: list[tuple[int, ...]]) -> TvmArtifact:
        try:
            with quiet():
                fused = fuse(mod, self.tvm_target)
        except Exception as exc:  # TVM's legalization raises its own (and plain) errors
            raise BackendError(
                f"TVM could not lower the model ({first_line(exc, with_type=True)}). Use "
                "backend='onnxruntime' for this model."
            ) from exc
        database = TuningDatabase(self.database_path, self.tvm_target)
        tuning = self.tune(fused, database)
        tuning.warnings[:0] = database.warnings
        # not around tuning: its progress bar is live and its worker processes outlive it
        with quiet():
            executable, tasks = self._build(fused, database)
        artifact = TvmArtifact(executable, self.tvm_target, input_shapes, tasks, tuning, self.rpc)
        if heavy := artifact.heavy_untuned:
            # info, not warning: optimize()'s report warns of it (report_tvm); both printed it twice
            log.info(
                "TVM: %d compute-heavy task(s) run untuned schedules (%s); tune with trials=N "
                "or minutes=M for competitive latency.",
                len(heavy),
                ", ".join(heavy[:5]) + ("..." if len(heavy) > 5 else ""),
            )
        return artifact

    def _build(self, fused: tvm.IRModule, database: TuningDatabase) -> tuple[Any, list[Any]]:
        """The database's schedules applied, defaults for the rest, built into an executable."""
        scheduled, tasks = schedule(fused, database, self.tvm_target, self.seed)
        with self.tvm_target, tvm.transform.PassContext(opt_level=3):
            try:
                executable = tvm.compile(
                    scheduled, target=self.tvm_target, relax_pipeline=lower_pipeline()
                )
            except Exception as exc:
                raise BackendError(
                    f"TVM failed to build the module: {first_line(exc, with_type=True)}. TVM "
                    f"{tvm.__version__} cannot lower an operator of this model; use "
                    "backend='onnxruntime' for it."
                ) from exc
        return executable, tasks

    # ---- tuning

    def tune(self, fused: tvm.IRModule, database: TuningDatabase) -> TuningSummary:
        """Tune ``fused``'s heavy tasks within the budget, unless the database already has it."""
        return self._tuner().tune(fused, database)

    def _tuner(self) -> Tuner:
        return Tuner(
            self.tvm_target,
            self.trials,
            self.minutes,
            seed=self.seed,
            progress=self.progress,
            rpc=self.rpc,
        )

    # ---- measurement

    def measure(
        self,
        model: TvmArtifact | torch.nn.Module,
        inputs: Sequence[Any],
        *,
        warmup: int = 5,
        runs: int = 50,
        max_time_s: float = 10.0,
        use_cache: bool = True,
    ) -> Latency:
        """Median latency of one call of ``model`` on ``inputs`` (here, or on the RPC device).

        Same shape as the ONNX Runtime backend's ``measure``: a module is compiled first; the
        disk cache keys on the compiled library's bytes, the target and the input shapes.
        """
        arrays = [to_numpy(x) for x in inputs]
        if isinstance(model, torch.nn.Module):
            model = self.compile(model, [torch.from_numpy(a) for a in arrays])
        with tempfile.TemporaryDirectory() as tmp:
            lib = model.save(Path(tmp) / "model.so")
            digest = hashlib.blake2b(lib.read_bytes(), digest_size=16).hexdigest()
            key = cache_key(
                model=digest,
                target=target_json(self.tvm_target),
                backend=self.name,
                version=self.version,
                rpc=self.rpc.describe() if self.rpc else None,
                shapes=[(a.shape, str(a.dtype)) for a in arrays],
                runs=runs,
                warmup=warmup,
            )

            def measure() -> Latency:
                if self.rpc is not None:
                    return measure_library(lib, arrays, self.rpc, repeat=max(5, runs // 5))
                return time_callable(
                    lambda: model.run(arrays), warmup=warmup, runs=runs, max_time_s=max_time_s
                )

            return cached_latency(key, measure, self.cache, use_cache)

"""MetaSchedule tuning within a budget in trials and/or minutes, with a progress bar.

The module is legalized and fused first (``extract_tasks`` finds no tasks otherwise), then
MetaSchedule tunes the compute-heavy tasks (convolutions, matmuls, pooling, reductions) under
the budget. Records go to the :class:`~graphopt.backends.tvm.database.TuningDatabase`, which
also remembers the budget spent per model (:func:`model_key`), so a second run with the same
budget tunes nothing. Candidates are built on this machine by :func:`persistent_builder` and run
here or, given an RPC device, on that device (:mod:`graphopt.backends.tvm.rpc`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
import tvm_ffi

from graphopt.backends.measure import available_cores
from graphopt.backends.tvm.database import TuningDatabase
from graphopt.backends.tvm.lower import cross_compiler_name, is_cross
from graphopt.backends.tvm.rpc import RpcDevice, meta_schedule_runner
from graphopt.backends.tvm.schedule import is_heavy, prim_funcs
from graphopt.backends.tvm.summary import TuningSummary
from graphopt.backends.tvm.worker import CROSS_EXPORT, import_tensor_intrinsics, init_worker
from graphopt.core.progress import Progress, current
from graphopt.errors import BackendError

log = logging.getLogger(__name__)

SECONDS_PER_TRIAL = 1.5  # measured here: ResNet-18 candidates, 2 cores, persistent builder
BUILD_TIMEOUT_S = 120.0  # MetaSchedule's 30 s default is less than a loaded 2-core machine needs


@dataclass(frozen=True)
class Tuner:
    """Tunes a fused module's heavy tasks for ``target`` within ``trials`` / ``minutes``
    (``trials`` 0: no tuning), measuring on this machine or on the ``rpc`` device."""

    target: tvm.target.Target
    trials: int
    minutes: float | None = None
    seed: int = 0
    progress: bool = False
    rpc: RpcDevice | None = None

    def expected_trials(self) -> int:
        """The trials the budget allows: ``trials``, or what ``minutes`` buys at ~1.5 s each.

        Sizes MetaSchedule's batches so that every task gets a first batch early and the
        gradient-based scheduler has budget left to spend where it pays.
        """
        by_time = int(self.minutes * 60 / SECONDS_PER_TRIAL) if self.minutes else self.trials
        return max(1, min(self.trials, by_time))

    def tune(self, fused: tvm.IRModule, database: TuningDatabase) -> TuningSummary:
        """Tune ``fused``'s heavy tasks within the budget, unless the database already has it."""
        summary = TuningSummary(
            database=str(database.path),
            trials_requested=self.trials,
            minutes_requested=self.minutes,
        )
        if not self.trials:
            return summary
        from tvm.s_tir import meta_schedule as ms

        # the budget counts from here: extracting tasks and starting the workers are tuning
        began = time.perf_counter()
        deadline = began + self.minutes * 60 if self.minutes else None
        key = model_key(fused)
        spent = database.budget_spent(key)
        tasks = [
            t
            for t in ms.relax_integration.extract_tasks(fused, self.target)
            if is_heavy(t.task_name)
        ]
        if not tasks:
            summary.warnings.append("no compute-heavy tasks to tune")
            return summary
        tasks = heaviest_first(tasks)
        # the records behind a recorded budget must still be there (not a wiped records file)
        covered = any(database.best_ms(t.dispatched[0]["main"]) is not None for t in tasks)
        enough_trials = spent.get("trials", 0) >= self.trials
        enough_time = self.minutes is not None and spent.get("minutes", 0) >= self.minutes
        if spent and (enough_trials or enough_time or spent.get("exhausted")) and covered:
            summary.reused = True
            return summary
        tracker = self._run(tasks, database, deadline)
        summary.curve = tracker.curve
        summary.trials_run = tracker.trials
        summary.failed_trials = tracker.failed
        summary.seconds = time.perf_counter() - began  # what the budget bounds
        summary.tasks_tuned = len(tasks)
        if tracker.first_error:
            summary.warnings.append(
                f"{tracker.failed} of {tracker.trials} trials failed; the first: "
                f"{tracker.first_error}"
            )
        exhausted = tracker.trials < self.trials and not tracker.deadline_hit
        minutes = self.minutes if tracker.deadline_hit else None
        database.add_budget(key, summary.trials_run, summary.seconds, minutes, exhausted)
        return summary

    def _run(
        self, tasks: list[Any], database: TuningDatabase, deadline: float | None
    ) -> _TuningTracker:
        from tvm.s_tir import meta_schedule as ms

        import_tensor_intrinsics()
        work_dir = database.path / "work"
        work_dir.mkdir(parents=True, exist_ok=True)
        budget = self.expected_trials()
        # MetaSchedule's console handler takes this logger's level: INFO floods the terminal
        # (the full logs still go to <database>/work/logs). graphopt -v keeps them.
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        ms_logger.setLevel(logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING)
        # MetaSchedule re-configures this logger on every tuning and lists its handlers by name;
        # an unnamed one (pytest's capture handler, say) makes that crash on the second run in
        # a process. Its own handlers are named and recreated from the configuration.
        for handler in [h for h in ms_logger.handlers if not h.get_name()]:
            ms_logger.removeHandler(handler)
        builder = persistent_builder(
            cross_compiler_name(self.target) if is_cross(self.target) else None,
        )
        builder.warm_up()
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(work_dir), strategy=_search_strategy(budget, len(tasks)), seed=self.seed
        )
        per_iter = max(2, min(64, budget // (2 * len(tasks))))
        tracker = _TuningTracker(
            [t.task_name for t in tasks],
            [float(w) for w in weights],
            self.trials,
            deadline,
            self.progress,
        )
        runner: Any = ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S)
        if self.rpc is not None:
            runner = meta_schedule_runner(self.rpc)
        builder.before_build = tracker.before_build
        start = time.perf_counter()
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(work_dir),
                max_trials_global=self.trials,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=runner,
                database=database.db,
                measure_callbacks=ms.MeasureCallback.create("default") + [tracker.callback()],
                task_scheduler=tracker.scheduler,
            )
        except Exception as exc:
            if not tracker.deadline_hit:  # the deadline arrives as an exception, by design
                raise BackendError(f"MetaSchedule tuning failed: {exc}") from exc
        finally:
            tracker.close()
        tracker.seconds = time.perf_counter() - start
        return tracker


def model_key(fused: tvm.IRModule) -> str:
    """A key for the model's tuning problem: its fused task structures (weights excluded)."""
    parts = sorted(str(tvm_ffi.structural_hash(f)) for f in prim_funcs(fused).values())
    return hashlib.blake2b("|".join(parts).encode(), digest_size=12).hexdigest()


def heaviest_first(tasks: list[Any]) -> list[Any]:
    """``tasks`` by weight x estimated FLOPs, most first. MetaSchedule's warm-up round gives
    every task a first batch in this order; a time budget that ends inside it is then spent
    where the model spends its time."""
    from tvm.s_tir.analysis import estimate_tir_flops

    def cost(task: Any) -> float:
        try:
            return float(task.weight) * float(estimate_tir_flops(task.dispatched[0]))
        except (tvm.error.TVMError, ValueError, TypeError, IndexError):  # no estimate: last
            return 0.0

    return sorted(tasks, key=cost, reverse=True)


def _search_strategy(trials: int, n_tasks: int) -> Any:
    """Evolutionary search sized to the budget.

    MetaSchedule's defaults (population 512, 4 genetic iterations) cost 5-18 s of search per
    batch on 2 cores, which dominates small batches; a budget of a few hundred trials does
    better spending that time on measured candidates.
    """
    from tvm.s_tir import meta_schedule as ms

    per_task = trials / max(1, n_tasks)
    small = per_task < 64
    return ms.search_strategy.EvolutionarySearch(
        population_size=128 if small else 512,
        init_min_unmeasured=32 if small else 50,
        genetic_num_iters=2 if small else 4,
    )


def persistent_builder(
    cross_cc: str | None = None,
    recycle_every: int = 25,
    before_build: Callable[[], None] | None = None,
) -> Any:
    """A MetaSchedule builder whose worker processes live across batches.

    ``LocalBuilder`` starts a fresh process pool for every batch (against a memory leak in
    long-lived workers); each worker then imports TVM and its tensor intrinsics before building:
    6-8 s per batch here, more than the builds. This pool is kept and recycled every
    ``recycle_every`` batches instead, and its workers start through :func:`init_worker`.
    ``cross_cc``: link candidates with that cross compiler (the workers register the export).
    ``before_build`` (also settable as an attribute): called before each batch is built (it
    may raise to stop tuning). :meth:`warm_up` starts the workers ahead of the first batch.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import (
        _serialize_params,
        _worker_func,
    )
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _PersistentBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool: Any = None
            self.batches = 0
            self.before_build = before_build

        def _get_pool(self) -> Any:
            if self.pool is None or self.batches >= recycle_every:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = PopenPoolExecutor(
                    max_workers=available_cores(),
                    timeout=BUILD_TIMEOUT_S,
                    initializer=functools.partial(init_worker, cross_cc),
                )
                self.batches = 0
            self.batches += 1
            return self.pool

        def warm_up(self) -> None:
            """Start the workers now, without waiting: they import TVM (seconds each, 40 s on
            a loaded 2-core machine) while MetaSchedule sets up the tasks and searches, not in
            the first batch, whose length decides whether a time budget is kept."""
            pool = self._get_pool()
            self.batches -= 1  # not a batch
            for _ in range(available_cores()):
                pool.submit(os.getpid)

        def build(self, build_inputs: list[Any]) -> list[Any]:
            if self.before_build is not None:
                self.before_build()
            pool = self._get_pool()
            jobs = [
                (
                    None,
                    CROSS_EXPORT if cross_cc else None,
                    b.mod,
                    b.target,
                    _serialize_params(b.params),
                )
                for b in build_inputs
            ]
            results = []
            for result in pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
                if result.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(result.value, None))
                elif result.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"timeout after {BUILD_TIMEOUT_S} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {result.value}"))
            return results

    return _PersistentBuilder()


def stop_before_batch(now: float, deadline: float, batches: list[float]) -> bool:
    """Whether tuning should stop before its next batch: past the deadline, or the next batch
    (as long as the median of the last five, ``batches`` in seconds) would end further past it
    than stopping now falls short of it. Either way the budget is missed by at most half a
    batch, where stopping only past the deadline misses it by up to a whole one."""
    if now >= deadline:
        return True
    if not batches:
        return False
    recent = sorted(batches[-5:])
    return now + recent[len(recent) // 2] / 2 > deadline


class TuningDeadline(Exception):
    """Raised from MetaSchedule's measure callback to end tuning when the time is up."""


class _TuningTracker:
    """Counts trials, enforces the time budget, draws the progress bar, records the curve.

    The curve is MetaSchedule's own estimate after each batch: the weighted sum of every task's
    best measured time so far (``est_ms``, recorded once every task has one measurement).
    """

    def __init__(
        self,
        names: list[str],
        weights: list[float],
        trials: int,
        deadline: float | None,
        progress: bool,
    ) -> None:
        self.names = names
        self.weights = weights
        self.best: dict[int, float] = {}
        self.trials = 0
        self.failed = 0
        self.first_error: str | None = None
        self.seconds = 0.0
        self.deadline_hit = False
        self.curve: list[dict[str, float]] = []
        self.deadline = deadline
        self.start = time.perf_counter()
        self.last: float | None = None  # when the last batch was built
        self.batches: list[float] = []  # seconds between builds: one batch each, search included
        from tvm.s_tir import meta_schedule as ms

        self.scheduler = ms.TaskScheduler.create("gradient")
        say = current() if current().enabled or not progress else Progress(True)
        by_time = deadline is not None and trials >= 100_000  # a budget in minutes only
        self._phase = say.phase(
            "tuning",
            None if by_time else trials,
            unit="trial",
            estimate_s=deadline - self.start if deadline is not None else None,
            leave=True,
        )
        self.bar = self._phase.__enter__()

    def callback(self) -> Any:
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        tracker = self

        @derived_object
        class _Callback(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, candidates, builds, runs) -> None:  # noqa: ANN001
                tracker.update(task_scheduler, int(task_id), builds, runs)

        return _Callback()

    def update(self, scheduler: Any, task_id: int, builds: Any, runs: Any) -> None:
        for build, run in zip(builds, runs, strict=False):
            self.trials += 1
            if build.error_msg or run.error_msg or not run.run_secs:
                self.failed += 1
                if self.first_error is None:
                    error = str(build.error_msg or run.error_msg or "no run time")
                    self.first_error = f"{self.names[task_id]}: {error.strip()[-600:]}"
                continue
            secs = float(np.mean([float(s) for s in run.run_secs]))
            if secs < self.best.get(task_id, float("inf")):
                self.best[task_id] = secs
        estimate = None
        if len(self.best) == len(self.names):
            estimate = sum(self.weights[i] * s for i, s in self.best.items()) * 1e3
        elapsed = time.perf_counter() - self.start
        point = {"trials": float(self.trials), "seconds": round(elapsed, 2)}
        if estimate is not None:
            point["est_ms"] = round(estimate, 4)
        self.curve.append(point)
        self.bar.note(
            f"{self.names[task_id][:28]}" + (f", est {estimate:.2f} ms" if estimate else "")
        )
        self.bar.set(self.trials)

    def before_build(self) -> None:
        """The deadline, kept before each batch is built. MetaSchedule reports nothing during
        its warm-up round (it joins the tasks' runs only after every task has sent a batch), so
        the measure callback alone cannot keep it. Out of time, the batches whose runs are done
        are joined (their records go to the database, the callback counts them; a run still
        going is dropped rather than waited for: 11 s on the loaded VM) and tuning stops
        by raising: terminating tasks from MetaSchedule's callbacks is unsafe (the gradient
        scheduler aborts on a terminated task it hands out next)."""
        if not self.out_of_time():
            return
        for i in range(len(self.scheduler.tasks_)):
            self.scheduler.touch_task(i)  # joins a task whose runs are done; waits for none
        self.deadline_hit = True
        raise TuningDeadline(f"time budget reached after {self.trials} trials")

    def out_of_time(self) -> bool:
        now = time.perf_counter()
        # the first "batch" includes setting the tasks up: an overestimate that errs on time
        self.batches.append(now - (self.last if self.last is not None else self.start))
        self.last = now
        return self.deadline is not None and stop_before_batch(now, self.deadline, self.batches)

    def close(self) -> None:
        self._phase.__exit__(None, None, None)

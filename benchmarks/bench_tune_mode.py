"""One fine-tuning step on the CPU in Eval, Tune and Deploy mode: step time and peak memory.

    python benchmarks/bench_tune_mode.py                     resnet50 + mobilenetv2, batch 16, 160x160
    python benchmarks/bench_tune_mode.py resnet50 --batch 8 --size 128 --runs 5

Writes benchmarks/results/tune_mode.json and tune_mode.md unless --json / --markdown say
otherwise. A step is ``zero_grad(set_to_none=True)``, forward, cross-entropy against random
labels, backward, ``SGD(momentum=0.9)`` step, on a zoo model (random weights and random
BatchNorm statistics) with every parameter trainable:

``eval``
    ``model.eval()``: BatchNorm frozen at its running statistics, the usual transfer-learning
    setting. Autograd keeps each conv's input *and* output (BN's backward needs it for
    ``d gamma``), and BN runs as an elementwise pass over the feature map, forward and backward.
``tune``
    ``graphopt.tune_mode(model)``: the same function and the same gradients (checked below),
    each Conv + BN computed as one conv with weights folded on the fly.
``deploy``
    BatchNorm folded into the convs once (graphopt's ``fold-conv-bn``), the folded weights
    trained directly. It is a *different* optimisation problem (per-channel learning rates
    differ by ``gamma**2 / (var + eps)``, see shared/notes/algorithms.md §1.3): shown as the
    speed and memory bound Tune mode aims for, not as an alternative.

Step time: the three modes of a model live in one process and are timed interleaved
(:func:`graphopt.backends.measure.time_interleaved`, the order rotating every round), so a change
in machine load hits them alike; median, p10 and p90, and the ratio to Eval mode. ``--rewarm``
defaults to 0 here: a step takes tenths of a second to seconds, so the worker threads a previous
step leaves spinning cost nothing measurable. The CPU time other processes used while timing is
recorded (``other_cpu_while_timing``, in cores).

Peak memory: each mode runs in a fresh subprocess of this script (``--memory-worker``), so the
allocator state one mode leaves behind can neither hide nor inflate another's. The worker builds
the model, optimizer and batch, runs one warm-up step (momentum buffers, oneDNN's caches), then
for each of ``--memory-steps`` steps resets the kernel's peak-RSS mark to the current RSS
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), runs the step and reads the mark back
(``VmHWM``). Reported: ``step_peak_mb``, the most a step needs above the RSS before it, and
``peak_rss_mb``, the process's whole high-water mark (Python, libtorch, the model and optimizer
state included). The RSS before a step holds the model, the momentum buffers and the previous
step's gradients, which the step's ``zero_grad`` frees before the new ones are made: the step
peak is the activations autograd saves, plus what of the new gradients and the kernels'
workspaces is alive at the worst moment: the part Tune mode changes. The worker
runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every tensor-sized block with mmap and
returns it to the system when freed: RSS then follows the live tensors instead of keeping freed
heap pages, which would let a step reuse pages the warm-up touched and look free. Not used, and
why: ``tracemalloc`` sees only Python's allocations, not libtorch's; ``ru_maxrss`` is the
lifetime peak, which the model build can set (used only as a fallback where ``clear_refs`` cannot
be written, marked in the output); torch.profiler's memory events were incomplete on this CPU
build (allocations made before profiling started have no size).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import bench, zoo
from graphopt.backends.measure import time_interleaved
from graphopt.core.pass_infra import PassContext
from graphopt.core.progress import Progress
from graphopt.frontends.torch import capture
from graphopt.pipeline import PassManager

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("eval", "tune", "deploy")
TITLES = {"eval": "Eval", "tune": "Tune (graphopt.tune_mode)", "deploy": "Deploy (BN folded)"}

#: the issue's bar for ResNet-50's Tune mode against Eval mode, measured in one run
MEMORY_BAR = 0.8
TIME_BAR = 1.0


# --------------------------------------------------------------------------------------------
# building the modes and a step


def build(name: str, mode: str, size: int) -> tuple[nn.Module, dict[str, int]]:
    """The zoo model ``name`` in ``mode``, every parameter trainable; and the pass statistics."""
    model = zoo.get(name).model  # eval mode, random BN statistics
    for p in model.parameters():
        p.requires_grad_(True)
    if mode == "eval":
        return model, {}
    if mode == "tune":
        tuned = graphopt.tune_mode(model)
        return tuned, dict(tuned.meta["graphopt.tune_conv_bn"])
    if mode == "deploy":
        example = (torch.randn(1, 3, size, size),)
        gm = capture(model, example).graph
        result = PassManager("fold-conv-bn", strict=True).run(
            gm, PassContext(sample_inputs=example)
        )
        folded = result.graph
        for p in folded.parameters():
            p.requires_grad_(True)
        return folded, dict(result.records[0].stats)
    raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


def batch(batch_size: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, size, size, generator=gen)
    return x, torch.randint(0, 1000, (batch_size,), generator=gen)


def make_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> Callable[[], Any]:
    """One fine-tuning step of ``module`` on ``(x, y)``."""
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        opt.step()

    return step


def check(modules: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Tune against Eval: loss and worst gradient (max |diff| / max |eval grad|, per parameter);
    Deploy against Eval: the output only (its parameters are other tensors)."""
    outs, grads = {}, {}
    for mode, module in modules.items():
        module.zero_grad(set_to_none=True)
        out = module(x)
        F.cross_entropy(out, y).backward()
        outs[mode] = out.detach()
        grads[mode] = {n: p.grad.clone() for n, p in module.named_parameters()}
        module.zero_grad(set_to_none=True)

    def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
        scale = ref.abs().max().item()
        return (
            (got - ref).abs().max().item() / scale if scale > 0 else (got - ref).abs().max().item()
        )

    result = {}
    if "tune" in modules:
        result["tune_output_rel_error"] = rel(outs["eval"], outs["tune"])
        result["tune_worst_grad_rel_error"] = max(
            rel(g, grads["tune"][n]) for n, g in grads["eval"].items()
        )
    if "deploy" in modules:
        result["deploy_output_rel_error"] = rel(outs["eval"], outs["deploy"])
    return result


# --------------------------------------------------------------------------------------------
# peak memory, one subprocess per mode


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_worker(args: argparse.Namespace) -> int:
    """Run in a fresh process: build one mode, warm up, measure each step's peak RSS."""
    if args.threads:
        torch.set_num_threads(args.threads)
    module, _ = build(args.worker_model, args.worker_mode, args.size)
    x, y = batch(args.batch, args.size)
    step = make_step(module, x, y, args.lr)
    step()  # warm-up: momentum buffers, oneDNN primitive caches
    peaks, method = [], "clear_refs"
    for _ in range(args.memory_steps):
        gc.collect()
        before = _status_kb("VmRSS")
        if not _reset_peak():
            method = "ru_maxrss (lifetime peak: clear_refs not writable)"
        step()
        peak = (
            _status_kb("VmHWM")
            if method == "clear_refs"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        peaks.append((peak - before, peak))
    growth, total = max(peaks)
    print(
        json.dumps(
            {
                "step_peak_mb": round(growth / 1024, 1),
                "peak_rss_mb": round(max(p for _, p in peaks) / 1024, 1),
                "rss_before_step_mb": round((total - growth) / 1024, 1),
                "method": method,
            }
        )
    )
    return 0


def measure_memory(name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-worker",
        name,
        mode,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--memory-steps",
        str(args.memory_steps),
        "--lr",
        str(args.lr),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory worker failed ({out.returncode}): {tail}"[:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# the benchmark


def bench_model(name: str, args: argparse.Namespace, say: Progress) -> dict[str, Any]:
    start = time.perf_counter()
    memory: dict[str, Any] = {}
    if not args.no_memory:
        for mode in MODES:
            say(f"{name}: peak memory of a {mode}-mode step (fresh process)")
            memory[mode] = measure_memory(name, mode, args)
            say(f"{name}: {mode}: {memory[mode]}")
    x, y = batch(args.batch, args.size)
    modules, stats = {}, {}
    for mode in MODES:
        say(f"{name}: building {mode} mode")
        modules[mode], stats[mode] = build(name, mode, args.size)
    correctness = check(modules, x, y)
    say(f"{name}: {correctness}")
    steps = {mode: make_step(module, x, y, args.lr) for mode, module in modules.items()}
    say(
        f"{name}: timing {', '.join(MODES)} interleaved (warmup {args.warmup}, up to "
        f"{args.runs} runs or {args.max_time_s:g} s)"
    )
    probe = bench.CpuProbe()
    latencies = time_interleaved(
        steps,
        warmup=args.warmup,
        runs=args.runs,
        max_time_s=args.max_time_s,
        rewarm=args.rewarm,
    )
    other_cpu = probe.others()
    times = {
        mode: {
            "median_ms": lat.median_ms,
            "p10_ms": lat.p10_ms,
            "p90_ms": lat.p90_ms,
            "runs": lat.runs,
        }
        for mode, lat in latencies.items()
    }
    base = times["eval"]["median_ms"]
    result = {
        "model": name,
        "batch": args.batch,
        "size": args.size,
        "parameters_m": round(sum(p.numel() for p in modules["eval"].parameters()) / 1e6, 2),
        "pass_stats": {m: s for m, s in stats.items() if s},
        "correctness": correctness,
        "time": times,
        "time_vs_eval": {m: t["median_ms"] / base for m, t in times.items()},
        "memory": memory,
        "memory_vs_eval": _memory_ratios(memory),
        "other_cpu_while_timing": other_cpu,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    say(f"{name}: done: {result['time_vs_eval']}, memory {result['memory_vs_eval']}")
    return result


def _memory_ratios(memory: dict[str, Any]) -> dict[str, float]:
    base = memory.get("eval", {}).get("step_peak_mb")
    if not base:
        return {}
    return {m: v["step_peak_mb"] / base for m, v in memory.items() if "step_peak_mb" in v}


def markdown(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    first = results[0] if results else {}
    lines = [
        f"One fine-tuning step (forward, cross-entropy, backward, SGD with momentum), batch "
        f"{first.get('batch')} at {first.get('size')}x{first.get('size')}, every parameter "
        f"trainable; {machine.get('cpu')}, {machine.get('cores')} cores, torch "
        f"{machine.get('torch')} with {machine.get('torch_threads')} threads; {machine.get('date')}. "
        "Step time: median of interleaved runs in one process. Step peak: the most RSS a step "
        "needs above the RSS before it, each mode in a fresh process (see the script's "
        "docstring). Ratios against Eval mode (<1 = less).",
        "",
        "| model | mode | step ms | p10-p90 ms | time vs Eval | step peak MB | memory vs Eval "
        "| peak RSS MB |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for res in results:
        for mode in MODES:
            t = res["time"][mode]
            mem = res["memory"].get(mode, {})
            lines.append(
                f"| {res['model']} | {TITLES[mode]} | {t['median_ms']:.0f} | "
                f"{t['p10_ms']:.0f}-{t['p90_ms']:.0f} | {res['time_vs_eval'][mode]:.2f}x | "
                f"{mem.get('step_peak_mb', '–')} | "
                + (
                    f"{res['memory_vs_eval'][mode]:.2f}x"
                    if mode in res.get("memory_vs_eval", {})
                    else "–"
                )
                + f" | {mem.get('peak_rss_mb', '–')} |"
            )
            if "error" in mem:
                notes.append(f"{res['model']}, {mode}: {mem['error']}")
            elif mem.get("method", "clear_refs") != "clear_refs":
                notes.append(f"{res['model']}, {mode}: memory by {mem['method']}")
        c = res["correctness"]
        notes.append(
            f"{res['model']}: Tune vs Eval, output {c.get('tune_output_rel_error', 0):.1e} and worst "
            f"gradient {c.get('tune_worst_grad_rel_error', 0):.1e} (max |diff| / max |Eval|); "
            f"Deploy vs Eval output {c.get('deploy_output_rel_error', 0):.1e}; "
            f"pass statistics {res['pass_stats']}"
        )
        if (res.get("other_cpu_while_timing") or 0) > bench.BUSY:
            notes.append(
                f"{res['model']}: other processes used {res['other_cpu_while_timing']:.1f} cores "
                "while timing: absolute times are noisy, the interleaved ratios less so"
            )
        if res["model"] == "resnet50" and "tune" in res.get("memory_vs_eval", {}):
            mem, tim = res["memory_vs_eval"]["tune"], res["time_vs_eval"]["tune"]
            notes.append(
                f"resnet50, Tune vs Eval: step peak memory {mem:.2f}x (bar <= {MEMORY_BAR}x: "
                f"{'met' if mem <= MEMORY_BAR else 'NOT met'}), step time {tim:.2f}x (bar <= "
                f"{TIME_BAR}x: {'met' if tim <= TIME_BAR else 'NOT met'})"
            )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["resnet50", "mobilenetv2"])
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--size", type=int, default=160, help="input height = width (default 160)")
    parser.add_argument("--runs", type=int, default=10, help="timed steps per mode (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (default 2)")
    parser.add_argument(
        "--rewarm", type=int, default=0, help="untimed steps before each timed one (default 0)"
    )
    parser.add_argument(
        "--max-time-s", type=float, default=300.0, help="timing budget per model (default 300)"
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate (default 1e-4)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="measured steps per memory worker (default 2)"
    )
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--json", default=str(RESULTS / "tune_mode.json"), metavar="PATH")
    parser.add_argument("--markdown", default=str(RESULTS / "tune_mode.md"), metavar="PATH")
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_worker:
        args.worker_model, args.worker_mode = args.memory_worker
        return memory_worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        zoo.describe(name)  # an unknown name fails now, with the close matches
    say = Progress(True, prefix="tune-mode ")
    machine = bench.machine_info()
    settings = {
        k: v for k, v in vars(args).items() if k not in ("json", "markdown", "memory_worker")
    }
    results = []
    for name in args.models:
        results.append(bench_model(name, args, say))
        payload = {"machine": machine, "settings": settings, "results": results}
        bench.write_text(args.json, json.dumps(payload, indent=2) + "\n")
        bench.write_text(args.markdown, markdown(results, machine))
    print(markdown(results, machine))
    print(f"JSON: {args.json}; Markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

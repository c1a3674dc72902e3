"""The command line of ``graphopt bench`` and ``benchmarks/bench_zoo.py``: options, the run,
partial results written after every model."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from graphopt import zoo
from graphopt.bench.harness import REWARM, run_benchmark
from graphopt.bench.machine import machine_info
from graphopt.bench.output import markdown_table, write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``graphopt bench`` and ``benchmarks/bench_zoo.py``."""
    parser.add_argument(
        "models",
        nargs="*",
        default=[],
        help="zoo models to benchmark (default: all, see `graphopt zoo`)",
    )
    parser.add_argument("--runs", type=int, default=30, help="timed calls per runner (default 30)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed calls per runner before timing (default 5)"
    )
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="write results and machine info as JSON"
    )
    parser.add_argument(
        "--markdown", default=None, metavar="PATH", help="write the results table as Markdown"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO")
    parser.add_argument(
        "--max-time-s",
        type=float,
        default=60.0,
        help="timing budget per model in seconds (default 60; at least 5 rounds are always timed)",
    )
    parser.add_argument(
        "--rewarm",
        type=int,
        default=REWARM,
        metavar="N",
        help="untimed calls of a runner before each of its timed calls, so "
        "the previous runner's threads do not disturb it (default "
        f"{REWARM}; 0: back to back)",
    )
    parser.add_argument(
        "--wait-idle-s",
        type=float,
        default=0.0,
        metavar="S",
        help="on a shared machine: per model, wait up to S seconds for other "
        "processes to go quiet before timing, and time again if they "
        "were busy meanwhile (default 0: time at once)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the benchmark for ``args`` (from :func:`add_arguments`); print and write results."""
    names = list(args.models) or zoo.names()
    for name in names:  # an unknown name fails now, not after an hour of timing
        if name not in zoo.names():
            zoo.get(name)  # raises GraphoptError with the close matches
    start = time.perf_counter()
    machine = machine_info()
    settings = {
        "runs": args.runs,
        "warmup": args.warmup,
        "max_time_s": args.max_time_s,
        "rewarm": args.rewarm,
        "wait_idle_s": args.wait_idle_s,
        "compile": not args.no_compile,
        "openvino": not args.no_openvino,
    }

    def write(results: list[dict[str, Any]], done: bool) -> None:
        if args.json:
            payload = {
                "machine": machine,
                "settings": settings,
                "complete": done,
                "wall_s": round(time.perf_counter() - start, 1),
                "results": results,
            }
            write_text(args.json, json.dumps(payload, indent=2, default=str) + "\n")
        if args.markdown:
            write_text(args.markdown, markdown_table(results, machine=machine) + "\n")

    results = run_benchmark(
        names,
        runs=args.runs,
        warmup=args.warmup,
        compile=not args.no_compile,
        openvino=not args.no_openvino,
        max_time_s=args.max_time_s,
        rewarm=args.rewarm,
        wait_idle_s=args.wait_idle_s,
        progress=True,
        on_result=lambda done: write(done, False),
    )
    write(results, True)
    print(markdown_table(results, machine=machine))
    print(
        f"\n{len(results)} model(s) in {time.perf_counter() - start:.0f} s"
        + (f"; JSON: {args.json}" if args.json else "")
        + (f"; Markdown: {args.markdown}" if args.markdown else "")
    )
    return 0

"""The pass manager's rollback backup: ``graphopt.core.copying.deep_copy`` against
``copy.deepcopy`` on captured graphs (the fuzz profile's random CNNs and zoo models), timed
interleaved in one process (medians of per-graph rounds, and their ratio), with the fuzz
profile's time per model through the default pipeline for scale.

    python benchmarks/bench_backup_copy.py [--graphs 40] [--rounds 15]
        -> benchmarks/results/backup_copy.md

The pass manager copies the graph before every pass; on small graphs that copy was a third of
each fuzz model's time (cProfile of ``fuzz(range(150), default pipeline)``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from graphopt.core.copying import deep_copy
from graphopt.frontends.torch import capture
from graphopt.target import Target
from graphopt.testing import fuzz, fuzz_case
from graphopt.zoo import get as zoo_model

RESULTS = Path(__file__).parent / "results"


def _graphs(n: int) -> dict[str, list[torch.fx.GraphModule]]:
    fuzzed = []
    for seed in range(n):
        fc = fuzz_case(seed, "cnn")
        fuzzed.append(capture(fc.source, fc.inputs).graph)
    zoo = {}
    for name in ("mobileone_s0", "resnet18"):
        z = zoo_model(name)
        zoo[name] = [capture(z.model, z.example_inputs).graph]
    return {f"{n} fuzz CNNs (cnn family)": fuzzed, **zoo}


def _per_copy_ms(copier, graphs) -> float:
    start = time.perf_counter()
    for g in graphs:
        copier(g)
    return (time.perf_counter() - start) / len(graphs) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for label, graphs in _graphs(args.graphs).items():
        times: dict[str, list[float]] = {"copy.deepcopy": [], "deep_copy": []}
        for i in range(args.rounds):  # alternate, so drift in load hits both alike
            order = [("copy.deepcopy", copy.deepcopy), ("deep_copy", deep_copy)]
            for name, copier in order if i % 2 else order[::-1]:
                times[name].append(_per_copy_ms(copier, graphs))
        old, new = (statistics.median(times[k]) for k in ("copy.deepcopy", "deep_copy"))
        rows.append(f"| {label} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")
    pipeline = Target.parse("cpu").default_pipeline
    fuzz(range(1000, 1010), pipeline)  # warm
    report = fuzz(range(200), pipeline)
    lines = [
        "# The pass manager's backup copy",
        "",
        "ms per copy, median of rounds (one thread, interleaved):",
        "",
        "| graphs | copy.deepcopy | deep_copy | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        f"For scale: the fuzz profile's default pipeline took {report.time_s / 200 * 1e3:.0f} ms "
        f"per model here ({report.summary().splitlines()[0]}).",
    ]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backup_copy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Benchmark graphopt against torch eager, torch.compile, ONNX Runtime and OpenVINO on the zoo.

    python benchmarks/bench_zoo.py                     all zoo models, 30 runs
    python benchmarks/bench_zoo.py resnet18 --runs 10 --no-compile

Writes benchmarks/results/zoo.json and benchmarks/results/zoo.md unless --json / --markdown
say otherwise. The same as ``graphopt bench`` (see graphopt/bench/ and benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graphopt import bench

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    parser.set_defaults(json=str(RESULTS / "zoo.json"), markdown=str(RESULTS / "zoo.md"))
    return bench.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

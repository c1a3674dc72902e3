"""The ``graphopt`` command (also ``python -m graphopt``).

graphopt optimize resnet18 --target cpu [-o out.onnx] [--pipeline STR] [--json report.json]
graphopt optimize model.onnx --target cpu -o model.opt.onnx
graphopt optimize resnet18 --backend tvm --tune-minutes 20 -o resnet18.so
graphopt optimize resnet18 --target aarch64-linux --backend tvm --rpc 127.0.0.1:9190/board
graphopt optimize resnet18 --int8 --calibration data.npz [--max-drop 0.01] -o resnet18.int8.onnx
graphopt passes                 every pass with its doc, options and numerics
graphopt zoo                    the built-in models
graphopt bench [MODELS...]      graphopt against torch eager, torch.compile, ONNX Runtime...
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import sys
from pathlib import Path

from graphopt.errors import GraphoptError


def _cmd_optimize(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt import zoo
    from graphopt.pass_manager import DumpIR, PrintIR

    source = args.model
    if Path(source).suffix == ".onnx" or Path(source).exists():
        model, inputs, name = source, None, Path(source).name
    else:
        if not args.quiet:  # digits_cnn trains for a few seconds on its first use
            print(f"building zoo model {source} ({zoo.describe(source)})", file=sys.stderr)
        entry = zoo.get(source)
        model, inputs, name = entry.model, entry.example_inputs, entry.name
    instruments = []
    if args.print_ir:
        instruments.append(PrintIR())
    if args.dump_ir:
        instruments.append(DumpIR(args.dump_ir))
    calibration = (
        _load_calibration(args.calibration, args.calibration_batch) if args.calibration else None
    )
    int8 = {}
    if args.int8:
        int8 = {"precision": "int8", "max_drop": args.max_drop}
    elif args.max_drop is not None:
        raise GraphoptError("--max-drop applies to int8 quantisation; add --int8.")
    result = graphopt.optimize(
        model,
        args.target,
        inputs,
        args.pipeline,
        calibration_data=calibration,
        **int8,
        strict=args.strict,
        verify=not args.no_verify,
        measure=not args.no_measure,
        instruments=instruments,
        progress=not args.quiet,
        name=name,
        backend=args.backend,
        trials=args.trials,
        tune_minutes=args.tune_minutes,
        database=args.database,
        rpc=args.rpc,
    )
    print(result.report)
    if args.output:
        path = result.save(args.output)
        print(f"\nsaved {path}")
        package = getattr(result.artifact, "mobile_package", None)
        if package is not None:  # .ort: the operators a reduced ONNX Runtime build needs
            print(package.describe())
            print(f"build: {package.build_command()}")
    if args.json:
        Path(args.json).write_text(result.report.to_json())
        print(f"report written to {args.json}")
    failed = result.report.rolled_back
    return 1 if failed and args.strict else 0


def _load_calibration(path: str, batch_size: int) -> list[tuple]:
    """Calibration batches from an ``.npz``: one array per model input, in input order (the
    order they were given to ``np.savez``), first axis = samples; cut into ``batch_size``."""
    import numpy as np

    if batch_size < 1:
        raise GraphoptError(f"--calibration-batch must be 1 or more, got {batch_size}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [npz[name] for name in npz.files]
    except (OSError, ValueError) as exc:
        raise GraphoptError(
            f"cannot read calibration data {path}: {exc}. Write it with "
            "numpy.savez(path, input0_samples, input1_samples, ...) (first axis = samples)."
        ) from exc
    if not arrays:
        raise GraphoptError(f"{path} holds no arrays; save one array per model input.")
    n = {a.shape[0] if a.ndim else 0 for a in arrays}
    if len(n) != 1 or 0 in n:
        raise GraphoptError(
            f"the arrays in {path} must all have the same number of samples on their first "
            f"axis; got shapes {', '.join(str(a.shape) for a in arrays)}."
        )
    total = n.pop()
    return [
        tuple(a[i : i + batch_size].astype(np.float32) for a in arrays)
        for i in range(0, total, batch_size)
    ]


def _cmd_passes(args: argparse.Namespace) -> int:
    from graphopt.pipeline import registered_passes

    for name, cls in registered_passes().items():
        doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
        print(f"{name}  [{cls.numerics}]")
        summary = " ".join(doc.split("\n\n")[0].split(":", 1)[-1].split()) if doc else ""
        print(f"    {summary}")
        options = getattr(cls, "Options", None)
        if options is not None and dataclasses.is_dataclass(options):
            for f in dataclasses.fields(options):
                kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
                print(f"    option {f.name}: {kind} = {f.default!r}")
        if args.verbose and doc:
            print("\n".join("    " + line for line in doc.splitlines()))
        print()
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from graphopt import zoo

    for name in zoo.names():
        print(f"{name:<16} {zoo.describe(name)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from graphopt import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphopt",
        description="Verified graph optimization "
        "of PyTorch and ONNX models for ONNX Runtime and TVM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what graphopt does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="optimize a zoo model or an .onnx file for a target")
    p.add_argument("model", help="a zoo model name (see `graphopt zoo`) or a path to an .onnx file")
    p.add_argument(
        "--target", default="cpu", help="cpu, cuda, llvm -mcpu=..., aarch64-linux, android-arm64"
    )
    p.add_argument("--pipeline", default=None, help="pipeline string; default: the target's")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=("onnxruntime", "tvm", "auto"),
        help="auto: the faster of ONNX Runtime (settings measured) and tuned TVM",
    )
    p.add_argument("--trials", type=int, default=0, help="TVM tuning budget in trials")
    p.add_argument("--tune-minutes", type=float, default=None, help="TVM tuning budget")
    p.add_argument("--database", default=None, help="TVM tuning database directory")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT/KEY", help="TVM RPC device")
    p.add_argument(
        "-o", "--output", default=None, help="write the optimized model (.onnx, .ort, .so)"
    )
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    p.add_argument("--strict", action="store_true", help="fail instead of rolling back a pass")
    p.add_argument("--no-verify", action="store_true", help="skip numeric checks")
    p.add_argument("--no-measure", action="store_true", help="skip the latency comparison")
    p.add_argument("--print-ir", action="store_true", help="print the IR diff after each pass")
    p.add_argument("--dump-ir", default=None, metavar="DIR", help="write IR after each pass")
    p.add_argument("--int8", action="store_true", help="quantise to int8 (needs --calibration)")
    p.add_argument(
        "--calibration",
        default=None,
        metavar="DATA.npz",
        help="calibration samples: one array per model input, in input order, first axis = "
        "samples (numpy.savez)",
    )
    p.add_argument(
        "--calibration-batch", type=int, default=32, help="samples per calibration batch"
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="int8: allowed drop of top-1 agreement with fp32 on the calibration data "
        "(e.g. 0.01); the most sensitive layers stay float until it holds",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser("passes", help="list the passes with their options")
    p.add_argument("--verbose", action="store_true", help="print each pass's full documentation")
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("zoo", help="list the built-in models")
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("bench", help="benchmark graphopt against the tools a user would pick")
    from graphopt.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `graphopt passes | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

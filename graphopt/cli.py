"""The ``graphopt`` command (also ``python -m graphopt``).

graphopt optimize resnet18 --target cpu [-o out.onnx] [--pipeline STR] [--json report.json]
graphopt optimize mobileone_s0 --report report.html   the report as a page with plots
graphopt optimize model.onnx --target cpu -o model.opt.onnx
graphopt optimize resnet18 --backend tvm --tune-minutes 20 -o resnet18.so
graphopt optimize resnet18 --target aarch64-linux --backend tvm --rpc 127.0.0.1:9190/board
graphopt optimize resnet18 --int8 --calibration data.npz [--max-drop 0.01] -o resnet18.int8.onnx
graphopt optimize my_model.py:build [--input-shape x:1x3x224x224] [--dtype ids:int64]
graphopt optimize mypackage.models:net --plugin mypasses.py --pipeline my-pass,fold-conv-bn
graphopt optimize my_model.py:build --metric my_eval.py:accuracy --calibration data.npz
graphopt passes                 every pass with its doc, options and numerics
graphopt zoo                    the built-in models with their input shapes
graphopt bench [MODELS...]      graphopt against torch eager, torch.compile, ONNX Runtime...
graphopt report report.json [-o report.html]   the HTML page of a saved JSON report
graphopt --version

Exit status: 0 done; 1 ``--strict`` and a pass was rolled back; 2 an error, reported as one
line ``graphopt: error: ...`` on stderr (``--debug`` adds the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import graphopt
from graphopt import __version__, bench, zoo
from graphopt.cli_model import (
    calibration_tensors,
    input_dtypes,
    is_python_spec,
    load_calibration,
    load_callable,
    load_plugin,
    option_docs,
    parse_dtypes,
    parse_shapes,
    random_inputs,
    user_model,
)
from graphopt.core.progress import Progress, current
from graphopt.core.registry import registered_passes
from graphopt.errors import GraphoptError, InputError
from graphopt.frontends.onnx import load_onnx
from graphopt.frontends.onnx.values import ONNX_TO_TORCH
from graphopt.pipeline import DumpIR, PrintIR, parse_pipeline
from graphopt.report.html import save_from_json
from graphopt.target import Target
from graphopt.zoo.registry import entry as zoo_entry


def _with_progress(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """One :class:`Progress` for the whole command (``-q``: none): building the model,
    optimize() and saving each show their phases, kept alive while they last."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        with Progress(not args.quiet).active():
            return command(args)

    return run


@_with_progress
def _cmd_optimize(args: argparse.Namespace) -> int:
    # everything a user typed is checked before a model is built or a minute is spent tuning
    if args.max_drop is not None and not args.int8:
        raise GraphoptError("--max-drop applies to int8 quantisation; add --int8.")
    Target.parse(args.target)
    for plugin in args.plugin or []:  # before the pipeline: it may name the plugin's passes
        load_plugin(plugin)
    if args.pipeline is not None:
        parse_pipeline(args.pipeline)
    _check_outputs(args)
    metric = load_callable(args.metric, "--metric") if args.metric else None
    calibration = (
        load_calibration(args.calibration, args.calibration_batch) if args.calibration else None
    )
    model, inputs, name = _load_model(args)
    if calibration is not None:  # as the model's inputs are typed, for every calibrating pass
        calibration = calibration_tensors(
            calibration, input_dtypes(model, inputs), args.calibration
        )
    instruments: list[Any] = []  # optimize() adds a reproducer of each rolled-back pass
    if args.print_ir:
        instruments.append(PrintIR())
    if args.dump_ir:
        instruments.append(DumpIR(args.dump_ir))
    int8 = {"precision": "int8", "max_drop": args.max_drop} if args.int8 else {}
    result = graphopt.optimize(
        model,
        args.target,
        inputs,
        args.pipeline,
        calibration_data=calibration,
        metric=metric,
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
        accept_mismatch=args.accept_mismatch,
        dynamic_axes=_dynamic_axes(args.dynamic_axes),
    )
    # saved before the report is printed: what save() notes (TVM's log lines) is in it
    if args.output:
        current()(f"saving {args.output}")
    path = result.save(args.output) if args.output else None
    current().done()  # the status line goes before the report is printed
    print(result.report)
    if path is not None:
        print(f"\nsaved {path}")
        package = result.artifact.mobile_package
        if package is not None:  # .ort: the operators a reduced ONNX Runtime build needs
            print(package.describe())
            print(f"build: {package.build_command()}")
    if args.json:
        try:
            Path(args.json).write_text(result.report.to_json())
        except OSError as exc:
            raise InputError(f"cannot write the report to {args.json}: {exc.strerror}.") from exc
        print(f"report written to {args.json}")
    if args.report:
        print(f"HTML report written to {result.report.save(args.report)}")
    failed = result.report.rolled_back
    return 1 if failed and args.strict else 0


def _load_model(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...] | None, str]:
    """The model to optimize, its example inputs (None: optimize() makes them from an ONNX
    file's declared shapes) and its name in the report."""
    source = args.model
    if is_python_spec(source):
        shapes = parse_shapes(args.input_shape, nameless=True)
        return user_model(source, shapes, parse_dtypes(args.dtype))
    if args.dtype:
        raise InputError(
            "--dtype applies to a Python model (file.py:factory); an ONNX file declares its "
            "inputs' types and a zoo model has its own."
        )
    if Path(source).suffix == ".onnx" or Path(source).exists():
        if not Path(source).is_file():
            raise InputError(
                f"{source}: no such file. Give a path to an .onnx file or a zoo model name "
                "(`graphopt zoo` lists them)."
            )
        return source, _onnx_inputs(source, args.input_shape), Path(source).name
    if os.sep in source or Path(source).suffix:  # a path, not a zoo name
        raise InputError(
            f"{source}: no such file, and not a zoo model. Give a path to an .onnx or .py file "
            "(file.py:factory), a module (package.module:attr) or a zoo model name "
            "(`graphopt zoo` lists them)."
        )
    if args.input_shape:
        raise InputError("--input-shape applies to an ONNX file or a Python model, not a zoo one.")
    # digits_cnn trains for a few seconds on its first use
    current()(f"building zoo model {source} ({zoo.describe(source)})")
    entry = zoo.get(source)
    return entry.model, entry.example_inputs, entry.name


def _dynamic_axes(specs: list[str] | None) -> dict[str, dict[int, str | None]] | None:
    """``--dynamic-axes x:0=batch,2=height`` (repeatable; ``x:0,2`` leaves the dims unnamed)
    as ``optimize``'s ``dynamic_axes``; None when not given."""
    if not specs:
        return None
    axes: dict[str, dict[int, str | None]] = {}
    for spec in specs:
        name, sep, rest = spec.rpartition(":")
        try:
            items = [item.partition("=") for item in rest.split(",") if item]
            axes[name] = {int(a): (d or None) for a, _, d in items}
        except ValueError:
            name = ""
        if not sep or not name or not axes.get(name):
            raise InputError(
                f"--dynamic-axes {spec!r}: write INPUT:AXIS[=NAME],... e.g. "
                "--dynamic-axes x:0=batch,3=width (one flag per input)."
            )
    return axes


def _onnx_inputs(path: str, specs: list[str] | None) -> tuple[Any, ...] | None:
    """Random example inputs of the ``--input-shape NAME:1x3x48x320`` sizes (one flag per
    input; dtypes as the file declares), or None: optimize() makes them from the declared
    shapes."""
    if not specs:
        return None
    shapes = parse_shapes(specs)
    declared = [(vi.name, vi.type.tensor_type.elem_type) for vi in load_onnx(path).graph.input]
    missing = [n for n, _ in declared if n not in shapes]
    unknown = [n for n in shapes if n not in dict(declared)]
    if missing or unknown:
        raise InputError(
            f"--input-shape names {sorted(shapes)}; the model's inputs are "
            f"{[n for n, _ in declared]}: give one flag per input."
        )
    dtypes = {name: ONNX_TO_TORCH.get(elem, torch.float32) for name, elem in declared}
    return random_inputs({name: shapes[name] for name, _ in declared}, dtypes)


def _check_outputs(args: argparse.Namespace) -> None:
    """Output paths that cannot be written fail now, not after the optimization."""
    outputs = (("-o/--output", args.output), ("--json", args.json), ("--report", args.report))
    for flag, value in outputs:
        if value is None:
            continue
        path = Path(value)
        if path.is_dir():
            raise InputError(f"{flag} {value} is a directory; give a file name.")
        if not path.parent.is_dir():
            raise InputError(
                f"{flag} {value}: the directory {path.parent} does not exist; create it first."
            )
    if args.report and Path(args.report).suffix.lower() not in (".html", ".htm", ".json"):
        raise InputError(f"--report {args.report}: give a .html (or .json) file name.")
    for flag, value in (("--dump-ir", args.dump_ir), ("--database", args.database)):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise InputError(f"{flag} {value} is a file; give a directory.")


def _cmd_passes(args: argparse.Namespace) -> int:
    for name, cls in registered_passes().items():
        doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
        stage = "" if cls.ir == "fx" else f", {cls.ir} stage (int8, after export)"
        print(f"{name}  [{cls.numerics}{stage}]")
        summary = " ".join(doc.split("\n\n")[0].split(":", 1)[-1].split()) if doc else ""
        print(f"    {summary}")
        options = getattr(cls, "Options", None)
        if options is not None and dataclasses.is_dataclass(options):
            docs = option_docs(options)
            for f in dataclasses.fields(options):
                kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
                about = f"  {docs[f.name]}" if docs.get(f.name) else ""
                print(f"    option {f.name}: {kind} = {f.default!r}{about}")
        if args.verbose and doc:
            print("\n".join("    " + line for line in doc.splitlines()))
        print()
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    rows = [(name, zoo_entry(name)) for name in zoo.names()]
    for name, row in rows:  # the declared input: no model is built to list them
        shape = "x".join(str(d) for d in row.input_shape)
        print(f"{name:<16} input {shape:<13} {row.task:<17} {row.description}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    print(f"HTML report written to {save_from_json(args.json_report, args.output)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    return bench.main(args)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (argparse prints the usage block as well)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"graphopt: error: {message} (see `{self.prog} --help`)\n")


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _amount(text: str) -> float:
    """argparse type: a finite number >= 0 (minutes, a metric drop)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser, default: object) -> None:
    # on the main parser and again after each command (``graphopt optimize ... --debug``)
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="on an error, print the traceback as well (and log at debug level)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="graphopt",
        description="Verified graph optimization "
        "of PyTorch and ONNX models for ONNX Runtime and TVM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what graphopt does")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    _add_common(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_optimize(sub)

    p = sub.add_parser("passes", help="list the passes with their options")
    _add_common(p, argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="print each pass's full documentation")
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("zoo", help="list the built-in models")
    _add_common(p, argparse.SUPPRESS)
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("report", help="the HTML page of a JSON report (written by --json)")
    _add_common(p, argparse.SUPPRESS)
    p.add_argument("json_report", metavar="REPORT.json", help="a report written by --json")
    p.add_argument("-o", "--output", default=None, help="the page (default: REPORT.html)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="benchmark graphopt against the tools a user would pick")
    _add_common(p, argparse.SUPPRESS)
    bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def _add_optimize(sub: Any) -> None:
    p = sub.add_parser("optimize", help="optimize a zoo model or an .onnx file for a target")
    _add_common(p, argparse.SUPPRESS)
    p.add_argument(
        "model",
        help="a zoo model name (see `graphopt zoo`), a path to an .onnx file, or a Python "
        "model: file.py:NAME or package.module:NAME naming an nn.Module, a Module class or a "
        "factory returning a module or (module, example_inputs)",
    )
    p.add_argument(
        "--target", default="cpu", help="cpu, cuda, llvm -mcpu=..., aarch64-linux, android-arm64"
    )
    p.add_argument("--pipeline", default=None, help="pipeline string; default: the target's")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=("onnxruntime", "tvm", "openvino", "auto"),
        help="auto: the fastest measured of ONNX Runtime settings, OpenVINO hints, tuned TVM",
    )
    p.add_argument("--trials", type=_count, default=0, help="TVM tuning budget in trials")
    p.add_argument("--tune-minutes", type=_amount, default=None, help="TVM tuning budget")
    p.add_argument("--database", default=None, help="TVM tuning database directory")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT/KEY", help="TVM RPC device")
    p.add_argument(
        "-o", "--output", default=None, help="write the optimized model (.onnx, .ort, .so)"
    )
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    p.add_argument(
        "--report",
        default=None,
        metavar="FILE.html",
        help="write the report as a self-contained HTML page with plots (or .json)",
    )
    p.add_argument("--strict", action="store_true", help="fail instead of rolling back a pass")
    p.add_argument(
        "--accept-mismatch",
        action="store_true",
        help="experts: return an artifact whose end-to-end check failed (warned in the report) "
        "instead of an error",
    )
    p.add_argument("--no-verify", action="store_true", help="skip numeric checks")
    p.add_argument("--no-measure", action="store_true", help="skip the latency comparison")
    p.add_argument("--print-ir", action="store_true", help="print the IR diff after each pass")
    p.add_argument("--dump-ir", default=None, metavar="DIR", help="write IR after each pass")
    p.add_argument("--int8", action="store_true", help="quantise to int8 (needs --calibration)")
    p.add_argument(
        "--calibration",
        default=None,
        metavar="DATA.npz",
        help="calibration samples for every pass that calibrates (int8, substitute-monarch, "
        "merge-convs{budget=...}): one array per model input, in input order, first axis = "
        "samples (numpy.savez)",
    )
    p.add_argument(
        "--calibration-batch", type=_positive_int, default=32, help="samples per calibration batch"
    )
    p.add_argument(
        "--max-drop",
        type=_amount,
        default=None,
        help="int8: allowed drop of top-1 agreement with fp32 on the calibration data "
        "(e.g. 0.01); the most sensitive layers stay float until it holds",
    )
    _add_model_inputs(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_optimize)


def _add_model_inputs(p: argparse.ArgumentParser) -> None:
    """``optimize``'s flags about the model's inputs and the user's own code."""
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:1x3x48x320",
        help="an input's example size (one flag per input): an ONNX file's where it declares a "
        "symbolic dimension other than the batch; a Python model's, named after forward()'s "
        "arguments (a lone flag may omit NAME), where its factory returns no example inputs",
    )
    p.add_argument(
        "--dynamic-axes",
        action="append",
        metavar="NAME:0=batch,3=width",
        help="an input's axes that take any size (one flag per input); default: the batch, "
        "and every symbolic dimension an ONNX file declares",
    )
    p.add_argument(
        "--dtype",
        action="append",
        metavar="[NAME:]int64",
        help="a Python model's input type for --input-shape (torch names: float32, float16, "
        "int64, bool...; one flag per input, or one without NAME for all); default float32",
    )
    p.add_argument(
        "--plugin",
        action="append",
        metavar="FILE.py|MODULE",
        help="import this file or module first, so the passes it registers can be named in "
        "--pipeline (repeatable; installed packages register through the graphopt.passes "
        "entry-point group without it)",
    )
    p.add_argument(
        "--metric",
        default=None,
        metavar="FILE.py:FN|MODULE:FN",
        help="metric(predict) -> float, higher is better (e.g. held-out accuracy): int8's "
        "--max-drop and merge-convs{budget=...} rank by it",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (see the module docstring). Errors are one line
    on stderr, never a traceback unless ``--debug`` asks for one."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: the user knows; no traceback, the shell's status
        return 130


def _main(argv: list[str] | None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, a bad argument (already printed)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except Exception as exc:  # a broken install (a plugin, a bench runner) fails here
        return _fail(exc, debug)
    debug = args.debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except BrokenPipeError:  # `graphopt passes | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        return _fail(exc, debug)


def _fail(exc: Exception, debug: bool) -> int:
    """Report an error as one line on stderr (the traceback first with ``--debug``); status 2."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, GraphoptError):
        message = one_line(str(exc)) or type(exc).__name__
    else:  # not raised on purpose: say so, and how to see where
        detail = one_line(str(exc))
        message = (
            f"unexpected {type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + ". "
            + ("" if debug else "Rerun with --debug for the traceback; ")
            + "please report it, this input should have been refused with a clear message."
        )
    print(f"graphopt: error: {message}", file=sys.stderr, flush=True)
    return 2


def one_line(text: str) -> str:
    """A multi-line message on one line: lines joined, a caret line under a pipeline dropped
    (the message already gives the column)."""
    lines = [line.strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})


if __name__ == "__main__":
    sys.exit(main())

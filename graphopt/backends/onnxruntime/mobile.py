"""Mobile path for ONNX Runtime: the ORT format, its operator config and an XNNPACK session file.

``save_ort_format`` runs ONNX Runtime's own converter (``python -m
onnxruntime.tools.convert_onnx_models_to_ort``, in a subprocess of this interpreter) on a copy of
the model in a temporary directory and copies next to the requested path:

    m.ort                                   the model in ORT format (a full build loads it too)
    m.required_operators[...].config        the operator kernels a reduced build must keep
    m.session.json                          what the app sets when it creates the session

The default optimization style is ``Runtime``: the converter then saves the graph after basic
optimizations only (``ai.onnx`` Conv, Relu, Gemm...) plus the fusions to replay at load time.
``Fixed`` bakes in this machine's level-"all" fusions, e.g. Conv+Relu -> ``com.microsoft``
FusedConv, which the XNNPACK execution provider does not take (its supported-op table lists
``ai.onnx:Conv``), so on the phone those convolutions would run on the CPU provider.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from graphopt._util import first_line
from graphopt.backends.onnxruntime.session import choose
from graphopt.backends.quiet import quiet
from graphopt.errors import BackendError

log = logging.getLogger(__name__)

STYLES = ("Fixed", "Runtime")
PLATFORMS = ("arm", "amd64")
CONVERTER = "onnxruntime.tools.convert_onnx_models_to_ort"
XNNPACK_DOCS = "https://onnxruntime.ai/docs/execution-providers/Xnnpack-ExecutionProvider.html"
XNNPACK_BUILD_DOCS = "https://onnxruntime.ai/docs/build/eps.html#xnnpack"
_STDERR_TAIL = 2000


@dataclass
class MobilePackage:
    """An ORT-format model with its reduced-build operator config and session settings."""

    ort_path: Path
    config_path: Path
    operators: dict[str, list[str]]  # "domain;opset" -> op types, as in the config file
    execution_provider_config: dict[str, Any]
    session_config_path: Path | None = None
    optimization_style: str = "Runtime"
    type_reduction: bool = False
    notes: list[str] = field(default_factory=list)

    def build_command(
        self,
        *,
        android_sdk_path: str = "$ANDROID_SDK_ROOT",
        android_ndk_path: str = "$ANDROID_NDK_HOME",
        android_api: int = 29,
        config: str = "MinSizeRel",
    ) -> str:
        """The ``build.sh`` line for a reduced-operator Android arm64 build with XNNPACK.

        Run it from the root of an onnxruntime checkout at the tag of the converter's version
        (``v{onnxruntime.__version__}``). Flags follow the XNNPACK section of ONNX Runtime's
        "Build with different EPs" page (``--minimal_build extended`` is required by XNNPACK).
        """
        args = [
            "./build.sh",
            "--config",
            config,
            "--android",
            "--android_sdk_path",
            android_sdk_path,
            "--android_ndk_path",
            android_ndk_path,
            "--android_abi",
            "arm64-v8a",
            "--android_api",
            str(android_api),
            "--minimal_build",
            "extended",
            "--use_xnnpack",
            "--disable_exceptions",
            "--build_shared_lib",
            "--skip_tests",
            "--include_ops_by_config",
            str(self.config_path.resolve()),
        ]
        if not any(key.startswith("ai.onnx.ml;") for key in self.operators):
            args.append("--disable_ml_ops")
        if self.type_reduction:
            args.append("--enable_reduced_operator_type_support")
        return " ".join(_shell_word(a) for a in args)

    def describe(self) -> str:
        """A few lines for a report: the files, operators per domain, and the op list."""
        by_domain: dict[str, set[str]] = {}
        for key, ops in self.operators.items():
            by_domain.setdefault(key.split(";")[0], set()).update(ops)
        total = sum(len(ops) for ops in by_domain.values())
        counts = ", ".join(f"{d} {len(ops)}" for d, ops in sorted(by_domain.items()))
        ep = self.execution_provider_config
        lines = [
            f"ORT-format model: {self.ort_path} ({self.ort_path.stat().st_size / 1024:.1f} KiB, "
            f"{self.optimization_style} optimization style)",
            f"operator config: {self.config_path} ({total} operators: {counts})",
        ]
        lines += [f"  {key}: {', '.join(ops)}" for key, ops in sorted(self.operators.items())]
        if self.session_config_path is not None:
            threads = ep["provider_options"]["XnnpackExecutionProvider"]["intra_op_num_threads"]
            lines.append(
                f"session settings: {self.session_config_path} (XNNPACK with {threads} threads, "
                "ORT intra-op pool 1 thread, spinning off)"
            )
        lines += self.notes
        return "\n".join(lines)


def save_ort_format(
    proto: onnx.ModelProto | str | Path,
    path: str | Path,
    *,
    optimization_style: str = "Runtime",
    target_platform: str = "arm",
    type_reduction: bool = False,
    xnnpack_threads: int = 4,
    timeout_s: float = 600.0,
) -> MobilePackage:
    """Convert an ONNX model (a ``ModelProto`` or an ``.onnx`` path) to ``path`` in ORT format.

    ``optimization_style``: ``"Runtime"`` (default, keeps ``ai.onnx`` ops for XNNPACK and saves
    the other fusions for replay) or ``"Fixed"``. ``target_platform``: ``"arm"`` for phones
    (leaves out x86-only layouts) or ``"amd64"``. ``type_reduction``: also record the types each
    operator needs (``--enable_type_reduction``) for a smaller build. ``xnnpack_threads``: the
    XNNPACK thread pool written to the session file; set it to the phone's big-core count.
    Raises ``BackendError`` with the converter's output when it fails.
    """
    style = choose("optimization_style", optimization_style, STYLES)
    platform = choose("target_platform", target_platform, PLATFORMS)
    if xnnpack_threads < 1:
        raise BackendError(f"xnnpack_threads must be 1 or more, not {xnnpack_threads}.")
    path = Path(path)
    if path.suffix.lower() != ".ort":
        raise BackendError(f"an ORT-format model is saved as '<name>.ort', not {path.name!r}.")
    with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
        work = Path(tmp)
        source = work / "model.onnx"
        _write_onnx(proto, source)
        _run_converter(source, style, platform, type_reduction, timeout_s)
        # the converter names its outputs after the level and style (the level can be changed
        # through an environment variable), so look for them instead of predicting the names
        ort_files = sorted(work.glob("*.ort"))
        configs = sorted(work.glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise BackendError(
                f"the ONNX Runtime converter exited cleanly but wrote "
                f"{[p.name for p in work.iterdir()]}; expected one .ort and one .config. "
                "Run it by hand: python -m " + CONVERTER + f" {source.name}."
            )
        config_name = configs[0].name.removeprefix("model.")
        path.parent.mkdir(parents=True, exist_ok=True)
        config_path = path.with_name(f"{path.stem}.{config_name}")
        shutil.copyfile(ort_files[0], path)
        shutil.copyfile(configs[0], config_path)
    _check_loads(path)
    operators = parse_operator_config(config_path)
    ep_config = xnnpack_session_config(path.name, xnnpack_threads, style)
    session_path = path.with_name(f"{path.stem}.session.json")
    session_path.write_text(json.dumps(ep_config, indent=2) + "\n")
    notes = []
    fused = [op for key, ops in operators.items() if key.startswith("com.microsoft;") for op in ops]
    if style == "Fixed" and "FusedConv" in fused:
        notes.append(
            "note: the Fixed style fused Conv+activation into com.microsoft:FusedConv, which the "
            "XNNPACK provider does not take; those convolutions will run on the CPU provider. "
            "Save with optimization_style='Runtime' to leave them to XNNPACK."
        )
        log.warning(notes[-1])
    return MobilePackage(
        path, config_path, operators, ep_config, session_path, style, type_reduction, notes
    )


def xnnpack_session_config(model_file: str, xnnpack_threads: int, style: str) -> dict[str, Any]:
    """What an app sets to run the model with XNNPACK, as ONNX Runtime's XNNPACK page advises.

    Followed: "Recommended configuration" in ONNX Runtime's XNNPACK Execution Provider docs
    (https://onnxruntime.ai/docs/execution-providers/Xnnpack-ExecutionProvider.html):
    XNNPACK has its own thread pool, so (1) turn off ORT intra-op spinning with the session
    config entry ``session.intra_op.allow_spinning`` = "0", (2) give XNNPACK
    ``intra_op_num_threads`` = the device's physical cores, (3) set ORT's intra-op pool to 1.
    Provider options are strings in every ORT API (C++ ``AppendExecutionProvider("XNNPACK",
    {...})``, Java ``addXnnpack(Map<String, String>)``). A Runtime-style model replays its saved
    optimizations only with ``session.enable_saved_runtime_optimizations`` = "1" (converter
    docs), which the nodes left to the CPU provider need to be fused.
    """
    entries = {"session.intra_op.allow_spinning": "0"}
    if style == "Runtime":
        entries["session.enable_saved_runtime_optimizations"] = "1"
    return {
        "model": model_file,
        "providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"],
        "provider_options": {
            "XnnpackExecutionProvider": {"intra_op_num_threads": str(xnnpack_threads)}
        },
        "session_options": {"intra_op_num_threads": 1},
        "session_config_entries": entries,
        "converted_with": f"onnxruntime {ort.__version__}",
        "see": XNNPACK_DOCS,
    }


def parse_operator_config(path: str | Path) -> dict[str, list[str]]:
    """``"domain;opset" -> [op, ...]`` from a reduced-build config (``#`` lines are comments).

    With type reduction an op carries a JSON type spec (``Conv{"inputs": {"0": ["float"]}}``);
    only the op names are kept.
    """
    operators: dict[str, list[str]] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(";", 2)
        if len(parts) != 3 or not parts[1].strip().isdigit():
            raise BackendError(
                f"{path}:{number}: expected 'domain;opset;Op1,Op2,...', found {raw!r}. "
                "Regenerate the config with save_ort_format."
            )
        ops = [_op_name(op) for op in _split_ops(parts[2])]
        key = f"{parts[0].strip()};{int(parts[1])}"
        operators.setdefault(key, []).extend(op for op in ops if op)
    return operators


def _split_ops(text: str) -> list[str]:
    """Split on commas outside the ``{...}`` type specs."""
    ops, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            ops.append(text[start:i])
            start = i + 1
    ops.append(text[start:])
    return ops


def _op_name(op: str) -> str:
    return op.split("{", 1)[0].strip()


def _write_onnx(proto: onnx.ModelProto | str | Path, target: Path) -> None:
    if isinstance(proto, onnx.ModelProto):
        try:
            onnx.save_model(proto, str(target))
        except Exception as exc:
            raise BackendError(f"could not write the ONNX model for conversion: {exc}") from exc
        return
    source = Path(proto)
    if not source.is_file():
        raise BackendError(f"no ONNX file at {source}; pass a ModelProto or an existing .onnx.")
    shutil.copyfile(source, target)


def _run_converter(
    source: Path, style: str, platform: str, type_reduction: bool, timeout_s: float
) -> None:
    cmd = [
        sys.executable,
        "-m",
        CONVERTER,
        "--optimization_style",
        style,
        "--target_platform",
        platform,
    ]
    if type_reduction:
        cmd.append("--enable_type_reduction")
    cmd.append(str(source))
    try:
        proc = subprocess.run(
            cmd,
            cwd=source.parent,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired as exc:
        raise BackendError(
            f"the ONNX Runtime converter did not finish in {timeout_s:.0f} s; pass a larger "
            "timeout_s, or run it by hand: " + shlex.join(cmd[1:])
        ) from exc
    if proc.returncode != 0:
        stderr = (proc.stderr or "").strip()
        last = stderr.splitlines()[-1] if stderr else f"exit status {proc.returncode}"
        raise BackendError(
            f"the ONNX Runtime converter failed: {last}\nThe model is probably not a valid ONNX "
            f"model for onnxruntime {ort.__version__}; check that onnxruntime.InferenceSession "
            f"loads it. Converter stderr (tail):\n{stderr[-_STDERR_TAIL:]}"
        )


def _check_loads(path: Path) -> None:
    """The .ort must load in this machine's (full) onnxruntime."""
    try:
        with quiet():
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(
            f"the converted model {path} does not load in onnxruntime {ort.__version__}: "
            f"{first_line(exc)}"
        ) from exc


def _shell_word(arg: str) -> str:
    """Quote for a POSIX shell, leaving ``$VAR`` placeholders to expand."""
    if re.fullmatch(r"\$\{?\w+\}?(/[\w./-]*)?", arg):
        return f'"{arg}"'
    return shlex.quote(arg)

"""What the ``graphopt`` command loads from the user's own code and files: a model
(``file.py:factory`` or ``package.module:attr``), a metric (``--metric``), pass plugins
(``--plugin``), the example inputs ``--input-shape`` / ``--dtype`` describe, and calibration
data (``--calibration data.npz``).

A file is imported as Python runs a script's neighbours: its directory goes on ``sys.path`` and
it is imported under its stem, so the classes it defines pickle by a name a reproducer (or any
other process with that directory on its path) imports again.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import os
import sys
import textwrap
import tokenize
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from graphopt._util import first_line
from graphopt.core.registry import registered_passes
from graphopt.errors import InputError
from graphopt.frontends.onnx import load_onnx
from graphopt.frontends.onnx.values import ONNX_TO_TORCH


def is_python_spec(source: str) -> bool:
    """``file.py``, ``file.py:attr`` or ``package.module:attr`` (not a zoo name, not .onnx)."""
    where, sep, attr = source.rpartition(":")
    if source.endswith(".py"):
        return True
    if not sep or not attr or Path(source).suffix == ".onnx":
        return False
    return where.endswith(".py") or all(part.isidentifier() for part in where.split("."))


def import_source(source: str, flag: str) -> ModuleType:
    """Import ``source``: a path to a ``.py`` file, or a module name (found from the current
    directory too, as ``python -m`` would). InputError, one line, when it cannot be."""
    if source.endswith(".py") or os.sep in source:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{flag} {source}: no such file.")
        directory, name = str(path.resolve().parent), path.stem
        if not name.isidentifier():
            raise InputError(
                f"{flag} {source}: {path.name} cannot be imported under that name; rename it "
                "to a Python identifier (letters, digits and _)."
            )
        if directory not in sys.path:
            sys.path.insert(0, directory)
        module = _import(name, flag, source)
        if Path(getattr(module, "__file__", "") or "").resolve() != path.resolve():
            raise InputError(
                f"{flag} {source}: a module named {name!r} is already imported from "
                f"{getattr(module, '__file__', 'elsewhere')}; rename the file."
            )
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    return _import(source, flag, source)


def _import(name: str, flag: str, source: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):  # not a dependency
            raise InputError(
                f"{flag} {source}: no module named {exc.name!r}; give a path to a .py file "
                "or a module importable from the current directory."
            ) from exc
        raise InputError(f"{flag} {source} failed to import: {first_line(exc)}.") from exc
    except Exception as exc:  # the user's code raised while importing: its first line
        raise InputError(
            f"{flag} {source} failed to import: {type(exc).__name__}: {first_line(exc)}."
        ) from exc


def load_object(spec: str, flag: str) -> Any:
    """The object ``file.py:name`` / ``package.module:name`` names (``name`` may be dotted)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not attr:
        module = import_source(spec, flag)
        found = [n for n, v in vars(module).items() if _loadable(v, module) and n[0] != "_"]
        raise InputError(
            f"{flag} {spec}: name what to load as {spec}:NAME"
            + (f"; the file defines {', '.join(found)}." if found else ".")
        )
    obj: Any = import_source(where, flag)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{flag} {spec}: {where} has no attribute {part!r}.")
        obj = getattr(obj, part)
    return obj


def _loadable(value: Any, module: ModuleType) -> bool:
    """A candidate for ``file.py:NAME``: a module instance, or a function / Module class that
    the file defines itself."""
    if isinstance(value, nn.Module):
        return True
    return callable(value) and getattr(value, "__module__", None) == module.__name__


def load_callable(spec: str, flag: str) -> Any:
    """``--metric module:fn``: a callable, or InputError."""
    fn = load_object(spec, flag)
    if not callable(fn):
        raise InputError(f"{flag} {spec} is a {type(fn).__name__}, not a callable.")
    return fn


def load_plugin(spec: str) -> list[str]:
    """``--plugin mypasses.py`` or ``--plugin package.module``: import it so that its
    ``@register_pass`` passes can be named in ``--pipeline``; returns their names."""
    registered_passes()  # the built-in passes first: a plugin's clash is reported as such
    module = import_source(spec, "--plugin")
    names = [n for n, cls in registered_passes().items() if cls.__module__ == module.__name__]
    if not names:
        raise InputError(
            f"--plugin {spec} registered no pass; decorate each pass class with "
            "graphopt.register_pass (README 'Writing a pass')."
        )
    return names


def user_model(
    spec: str, shapes: dict[str, list[int]], dtypes: dict[str, torch.dtype]
) -> tuple[nn.Module, tuple[Any, ...], str]:
    """The user's module and example inputs from ``spec``: an ``nn.Module``, a Module class or
    a factory returning a module or ``(module, example_inputs)``. ``--input-shape`` sizes (with
    ``--dtype`` types) replace the factory's inputs; without either, InputError."""
    obj = load_object(spec, "model")
    inputs: Any = None
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise InputError(
                f"{spec} is a {type(obj).__name__}; give an nn.Module or a function returning "
                "one (or a (module, example_inputs) pair)."
            )
        try:
            obj = obj()
        except Exception as exc:  # the user's factory: its first line says why
            raise InputError(
                f"{spec}() raised {type(exc).__name__}: {first_line(exc)}. Rerun with --debug "
                "for the traceback."
            ) from exc
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nn.Module):
            obj, inputs = obj
            inputs = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    if not isinstance(obj, nn.Module):
        raise InputError(
            f"{spec}() returned a {type(obj).__name__}; return an nn.Module or a "
            "(module, example_inputs) pair."
        )
    params = forward_inputs(obj)
    if shapes:
        inputs = random_inputs(_by_position(params, shapes, spec), dtypes)
    elif dtypes and inputs is not None:  # the factory's inputs, converted
        names = [*params, *[""] * len(inputs)]
        inputs = tuple(
            x.to(dtypes.get(n, dtypes.get("", x.dtype))) if isinstance(x, torch.Tensor) else x
            for n, x in zip(names, inputs, strict=False)
        )
    if inputs is None:
        raise InputError(
            f"{spec} gives no example inputs; add --input-shape for each input of forward() "
            f"({', '.join(params) or 'none declared'}), e.g. --input-shape "
            f"{params[0] if params else 'x'}:1x3x224x224, or return (module, example_inputs)."
        )
    return obj, inputs, type(obj).__name__


def forward_inputs(model: nn.Module) -> list[str]:
    """The names of ``model.forward``'s positional parameters, in order."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: no names to match
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind in kinds]


def _by_position(
    params: list[str], shapes: dict[str, list[int]], spec: str
) -> dict[str, list[int]]:
    """``--input-shape`` sizes in forward's order; a nameless one is forward's first input."""
    if "" in shapes and len(shapes) == 1 and params:
        return {params[0]: shapes[""]}
    unknown = [n for n in shapes if n not in params]
    if unknown or not params:
        raise InputError(
            f"--input-shape names {sorted(shapes)}; {spec}'s forward() takes "
            f"({', '.join(params)}): name each input of forward."
        )
    last = max(params.index(n) for n in shapes)
    if missing := [n for n in params[: last + 1] if n not in shapes]:
        raise InputError(
            f"--input-shape gives no size for {', '.join(missing)}, which forward() takes "
            "before the inputs given; add one flag per input."
        )
    return {n: shapes[n] for n in params[: last + 1]}


def parse_shapes(specs: list[str] | None, *, nameless: bool = False) -> dict[str, list[int]]:
    """``--input-shape NAME:1x3x48x320`` flags as {name: dims}; ``nameless`` lets one flag be
    a bare ``1x3x224x224`` (stored under "")."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            name = "-"
        if (not name and not nameless) or name == "-":
            raise InputError(
                f"--input-shape {spec!r}: write INPUT:DIMxDIMx... e.g. --input-shape "
                "x:1x3x48x320 (one flag per input)."
            )
    return shapes


def parse_dtypes(specs: list[str] | None) -> dict[str, torch.dtype]:
    """``--dtype input_ids:int64`` flags as {name: dtype}; a bare ``--dtype float16`` is every
    input's (stored under "")."""
    dtypes: dict[str, torch.dtype] = {}
    for spec in specs or []:
        name, _, kind = spec.rpartition(":")
        dtype = getattr(torch, kind, None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(
                f"--dtype {spec!r}: write [INPUT:]TYPE with a torch type name, e.g. "
                "--dtype input_ids:int64 or --dtype float16."
            )
        dtypes[name] = dtype
    return dtypes


def random_inputs(
    shapes: dict[str, list[int]], dtypes: dict[str, torch.dtype]
) -> tuple[torch.Tensor, ...]:
    """Example inputs of those sizes, in order: standard-normal floats (seeded), integers 0,
    booleans True."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for name, dims in shapes.items():
        dtype = dtypes.get(name, dtypes.get("", torch.float32))
        if dtype.is_floating_point:
            inputs.append(torch.randn(dims, generator=gen).to(dtype))
        elif dtype == torch.bool:
            inputs.append(torch.ones(dims, dtype=dtype))
        else:
            inputs.append(torch.zeros(dims, dtype=dtype))
    return tuple(inputs)


def load_calibration(path: str, batch_size: int) -> list[tuple]:
    """Calibration batches from an ``.npz``: one array per model input, in input order (the
    order they were given to ``np.savez``), first axis = samples; cut into ``batch_size``."""
    if batch_size < 1:
        raise InputError(f"--calibration-batch must be 1 or more, got {batch_size}.")
    how = (
        "Write it with numpy.savez(path, input0_samples, input1_samples, ...) (first axis = "
        "samples)."
    )
    if not Path(path).is_file():
        raise InputError(f"calibration data {path}: no such file. {how}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise InputError(
            f"calibration data {path} is a single .npy array, not an .npz archive. "
            "Save it with numpy.savez(path, samples) (one array per model input)."
        )
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"calibration data {path} is damaged or not an .npz archive (a zip of arrays). {how}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            arrays = [npz[name] for name in names]
    except Exception as exc:  # zip, CRC, header and object-array errors of a damaged file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise InputError(f"cannot read calibration data {path}: {reason}. {how}") from exc
    if not arrays:
        raise InputError(f"{path} holds no arrays; save one array per model input.")
    for name, a in zip(names, arrays, strict=True):
        if a.dtype.kind not in "biuf":
            raise InputError(
                f"array {name!r} in {path} has dtype {a.dtype}; calibration samples are numbers."
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InputError(
                f"array {name!r} in {path} holds NaN or infinite values; calibration samples "
                "must be finite."
            )
    n = {a.shape[0] if a.ndim else 0 for a in arrays}
    if len(n) != 1 or 0 in n:
        raise InputError(
            f"the arrays in {path} must all have the same number of samples on their first "
            f"axis; got shapes {', '.join(str(a.shape) for a in arrays)}."
        )
    total = n.pop()
    return [tuple(a[i : i + batch_size] for a in arrays) for i in range(0, total, batch_size)]


def input_dtypes(model: Any, inputs: tuple[Any, ...] | None) -> list[torch.dtype]:
    """The model's input types: its example inputs', or those an ONNX file declares."""
    if inputs is not None:
        return [x.dtype for x in inputs if isinstance(x, torch.Tensor)]
    graph = load_onnx(model).graph
    return [ONNX_TO_TORCH.get(vi.type.tensor_type.elem_type, torch.float32) for vi in graph.input]


def calibration_tensors(
    batches: list[tuple], dtypes: list[torch.dtype], path: str
) -> list[tuple[torch.Tensor, ...]]:
    """The ``.npz`` batches as tensors of the model's input types (uint8 images for a float
    model become floats), one array per input."""
    if batches and len(batches[0]) != len(dtypes):
        raise InputError(
            f"calibration data {path} holds {len(batches[0])} arrays; the model "
            f"takes {len(dtypes)} inputs: save one array per input, in input order."
        )
    return [
        tuple(torch.from_numpy(a).to(t) for a, t in zip(batch, dtypes, strict=True))
        for batch in batches
    ]


def option_docs(options: type) -> dict[str, str]:
    """One line about each field of a pass's ``Options``: the field's ``metadata["doc"]``, else
    the comment at the end of its line in the source (how graphopt's passes document them)."""
    docs = {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(options)}
    try:
        source = textwrap.dedent(inspect.getsource(options))
    except (OSError, TypeError):  # defined in a REPL or built at runtime: metadata only
        return docs
    names: dict[int, str] = {}
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in names:
                names[tok.start[0]] = tok.string
    except (tokenize.TokenError, SyntaxError):
        return docs
    for line, name in names.items():
        if name in docs and not docs[name] and comments.get(line):
            docs[name] = comments[line]
    return docs

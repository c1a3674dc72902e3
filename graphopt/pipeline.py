"""Pipeline strings and the one pass registry.

A pipeline is written MLIR style, passes separated by commas, options in braces::

    fold-conv-bn,eliminate-dead-code,merge-convs{max_kernel=7,budget=0.7}

``parse_pipeline(text)`` checks every pass name and option against the registry and returns a
:class:`Pipeline`; ``str(pipeline)`` prints it back exactly as written (whitespace aside).
Errors point at the offending character with a caret, suggest close pass names, and list the
valid options of a pass.

Option values are checked where they are made, in a pipeline string and in ``Pass(**values)``
alike (:func:`check_option`): the type of the ``Options`` field (an int is accepted for a
float), every number finite, and every number in ``[min, max]`` where ``min`` and ``max`` come
from the field's metadata, ``dataclasses.field(default=..., metadata={"min": 0, "max": 1})``.
Without metadata a number must be ``>= 0`` (options are sizes, counts, budgets, tolerances)
unless the field's default is itself negative.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import re
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphopt._util import close_matches
from graphopt.errors import PipelineError

if TYPE_CHECKING:
    from graphopt.pass_manager import Pass

_REGISTRY: dict[str, type[Pass]] = {}
_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipeline strings under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not _NAME.fullmatch(name or ""):
        raise PipelineError(
            f"pass class {cls.__qualname__} has invalid name {name!r}; "
            "use kebab-case, verb first, e.g. 'fold-conv-bn'."
        )
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise PipelineError(
            f"pass name {name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}."
        )
    _REGISTRY[name] = cls
    _check_on_construction(cls)
    return cls


def _check_on_construction(cls: type[Pass]) -> None:
    """Make ``cls.Options(...)`` check its values (see :func:`check_option`), so that
    ``Pass(budget="0.1")``, ``Pass(Options(...))`` and ``dataclasses.replace`` are checked as a
    pipeline string is. Only the pass's own ``Options``; a subclass shares its parent's."""
    options = cls.__dict__.get("Options")
    if options is None or not dataclasses.is_dataclass(options):
        return
    if "_graphopt_pass" in options.__dict__:  # already wrapped (registered twice)
        options._graphopt_pass = cls
        return
    init = options.__init__

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        check_options(type(self).__dict__.get("_graphopt_pass", cls), self)

    options.__init__ = checked_init
    options._graphopt_pass = cls


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes by name (imports graphopt's built-in passes first)."""
    importlib.import_module("graphopt.passes")
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(
            f"unknown pass {name!r}."
            + close_matches(name, passes)
            + " Run `graphopt passes` for the list."
        )
    return passes[name]


# ------------------------------------------------------------------------------------------------
# the parsed form


@dataclass(frozen=True)
class PassSpec:
    """One pass of a pipeline: its name and its options as written (``key -> text``)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"

    def instantiate(self) -> Pass:
        cls = get_pass(self.name)
        values = {key: _convert(cls, key, text) for key, text in self.options}
        return cls(**values)


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline; ``str()`` gives back the canonical text."""

    passes: tuple[PassSpec, ...]

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def instantiate(self) -> list[Pass]:
        return [spec.instantiate() for spec in self.passes]


def option_fields(cls: type[Pass]) -> dict[str, dataclasses.Field]:
    options = getattr(cls, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return {}
    return {f.name: f for f in dataclasses.fields(options)}


def format_value(value: Any) -> str:
    """Print an option value the way a pipeline string writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_.+\-/]+", value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _convert(cls: type[Pass], key: str, text: str) -> Any:
    fields = option_fields(cls)
    if key not in fields:
        valid = ", ".join(fields) or "none"
        raise PipelineError(
            f"pass {cls.name!r} has no option {key!r}."
            + close_matches(key, fields)
            + f" Valid options: {valid}."
        )
    value = _parse_text(cls, key, text)
    reason = _why_bad(fields[key], _hints(cls.Options).get(key), value)[0]
    if reason:
        raise PipelineError(
            f"bad value {text!r} for option {key!r} of pass {cls.name!r}: {reason}."
        )
    return value


def _parse_text(cls: type[Pass], key: str, text: str) -> Any:
    kind = _hints(cls.Options).get(key, str)
    raw = _unquote(text)
    allowed = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
    try:
        if allowed:
            if raw not in [str(a) for a in allowed]:
                raise ValueError(f"expected one of {', '.join(map(str, allowed))}")
            return next(a for a in allowed if str(a) == raw)
        base, optional = _split_optional(kind)
        if (optional or base is type(None)) and raw in ("none", "None"):
            return None
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if base is int:
            if not re.fullmatch(r"[+-]?\d+", raw):
                raise ValueError("expected an integer, e.g. 4")
            return int(raw)
        if base is float:
            try:
                return float(raw)
            except ValueError:
                raise ValueError("expected a number, e.g. 0.5") from None
        return raw
    except ValueError as exc:
        raise PipelineError(
            f"bad value {text!r} for option {key!r} of pass {cls.name!r}: {exc}."
        ) from None


def check_options(cls: type[Pass], options: Any) -> None:
    """:func:`check_option` on every field of the ``options`` dataclass of pass ``cls``; a
    coerced value (an int given for a float) is stored in place (frozen: set as-is)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        checked = check_option(cls, f.name, value)
        if checked is not value:
            object.__setattr__(options, f.name, checked)


def check_option(cls: type[Pass], key: str, value: Any) -> Any:
    """``value`` as option ``key`` of pass ``cls`` holds it (an int given for a float becomes a
    float), or :class:`PipelineError` naming the pass, the option, the value and what is valid.

    >>> check_option(get_pass("merge-convs"), "budget", float("nan"))
    Traceback (most recent call last):
    graphopt.errors.PipelineError: bad value nan for option 'budget' of pass 'merge-convs': ...
    """
    fields = option_fields(cls)
    if key not in fields:
        return value
    reason, checked = _why_bad(fields[key], _hints(cls.Options).get(key), value)
    if reason:
        hint = f" The default is {format_value(fields[key].default)}."
        if isinstance(value, str) and _number(value) is not None:
            hint = f" Give the number itself: {key}={_number(value)!r}, not the string {value!r}."
        raise PipelineError(
            f"bad value {value!r} for option {key!r} of pass {cls.name!r}: {reason}." + hint
        )
    return checked


def _number(text: str) -> float | int | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


@functools.cache
def _hints(options: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(options)
    except Exception:  # an annotation that does not resolve: the values are not type-checked
        return {}


def _why_bad(f: dataclasses.Field, kind: Any, value: Any) -> tuple[str, Any]:
    """``(reason, value)``: why ``value`` is not valid for field ``f`` of type ``kind`` ('' when
    it is), and the value as stored (ints given for a float field become floats)."""
    if kind is None:
        return "", value
    base, optional = _split_optional(kind)
    if value is None:
        if optional or base is type(None):
            return "", value
        return f"expected {_kind_name(kind)}, got None", value
    if typing.get_origin(base) is typing.Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            return f"expected one of {', '.join(map(repr, allowed))}", value
        return "", value
    if base is bool:
        if not isinstance(value, bool):
            return f"expected true or false, got {type(value).__name__}", value
        return "", value
    if base is int:
        # bool is an int subclass, but True for a count is a mistake
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return f"expected an integer, got {type(value).__name__}", value
        value = int(value)
    elif base is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return f"expected a float, got {type(value).__name__}", value
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            return f"expected a string, got {type(value).__name__}", value
        return "", value
    else:  # a type a pipeline string cannot write: the pass checks it
        return "", value
    low, high = _bounds(f)
    valid = f"valid: {_range_text(low, high, base)}"
    if not math.isfinite(value):
        return f"expected a finite number ({valid})", value
    if (low is not None and value < low) or (high is not None and value > high):
        return f"out of range ({valid})", value
    return "", value


def _bounds(f: dataclasses.Field) -> tuple[float | None, float | None]:
    """``(min, max)`` of a numeric option: its metadata, else ``>= 0`` (sizes, counts, budgets,
    tolerances), unless its default is negative (then the pass means negative values)."""
    if "min" in f.metadata or "max" in f.metadata:
        return f.metadata.get("min"), f.metadata.get("max")
    default = f.default
    if isinstance(default, numbers.Real) and not isinstance(default, bool) and default < 0:
        return None, None
    return 0, None


def _range_text(low: float | None, high: float | None, base: type) -> str:
    what = "integers" if base is int else "numbers"
    if low is not None and high is not None:
        return f"{what} in [{low}, {high}]"
    if low is not None:
        return f"{what} >= {low}"
    if high is not None:
        return f"{what} <= {high}"
    return f"finite {what}"


def _kind_name(kind: Any) -> str:
    base = _split_optional(kind)[0]
    return {int: "an integer", float: "a float", bool: "true or false", str: "a string"}.get(
        base, str(kind)
    )


def _split_optional(kind: Any) -> tuple[Any, bool]:
    """``float | None`` -> ``(float, True)``; a union of several types -> ``(object, ...)``."""
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        return (args[0] if len(args) == 1 else object), optional
    return kind, False


# ------------------------------------------------------------------------------------------------
# the parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> PipelineError:
        pos = self.pos if pos is None else pos
        caret = " " * pos + "^"
        return PipelineError(f"{message} at column {pos + 1}:\n  {self.text}\n  {caret}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        self.skip_ws()
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of pipeline"
            raise self.error(f"expected {char!r}, found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> tuple[str, int]:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            found = repr(self.peek()) if self.peek() else "end of pipeline"
            raise self.error(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(0), m.start()

    def value(self) -> str:
        self.skip_ws()
        start = self.pos
        if self.peek() == '"':
            self.pos += 1
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                self.pos += 2 if self.text[self.pos] == "\\" else 1
            if self.pos >= len(self.text):
                raise self.error("unterminated string", start)
            self.pos += 1
            return self.text[start : self.pos]
        while self.pos < len(self.text) and self.text[self.pos] not in ",{}=":
            self.pos += 1
        raw = self.text[start : self.pos].strip()
        if not raw:
            raise self.error("expected an option value")
        return raw

    def parse(self) -> Pipeline:
        specs: list[PassSpec] = []
        self.skip_ws()
        if not self.text.strip():
            return Pipeline(())
        while True:
            name, name_pos = self.match(_NAME, "a pass name (kebab-case, e.g. fold-conv-bn)")
            if name not in _REGISTRY:
                raise self.error(
                    f"unknown pass {name!r}." + close_matches(name, _REGISTRY), name_pos
                )
            options: list[tuple[str, str]] = []
            self.skip_ws()
            if self.peek() == "{":
                self.pos += 1
                fields = option_fields(_REGISTRY[name])
                while True:
                    key, key_pos = self.match(_KEY, "an option name")
                    if key not in fields:
                        valid = ", ".join(fields) or "none"
                        raise self.error(
                            f"pass {name!r} has no option {key!r}."
                            + close_matches(key, fields)
                            + f" Valid options: {valid}",
                            key_pos,
                        )
                    if key in dict(options):
                        raise self.error(f"option {key!r} given twice", key_pos)
                    self.expect("=")
                    value_pos = self.pos
                    text = self.value()
                    try:
                        _convert(_REGISTRY[name], key, text)
                    except PipelineError as exc:
                        raise self.error(str(exc).rstrip("."), value_pos) from None
                    options.append((key, text))
                    self.skip_ws()
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    self.expect("}")
                    break
            specs.append(PassSpec(name, tuple(options)))
            self.skip_ws()
            if not self.peek():
                return Pipeline(tuple(specs))
            self.expect(",")


def parse_pipeline(text: str | Pipeline) -> Pipeline:
    """Parse a pipeline string; raises :class:`PipelineError` pointing at the problem.

    >>> str(parse_pipeline("fold-conv-bn, eliminate-dead-code"))
    'fold-conv-bn,eliminate-dead-code'
    """
    if isinstance(text, Pipeline):
        return text
    if not isinstance(text, str):
        raise PipelineError(
            f"a pipeline is a string like 'fold-conv-bn,eliminate-dead-code', "
            f"not {type(text).__name__}."
        )
    registered_passes()
    return _Parser(text).parse()

"""Pipeline strings and the one pass registry.

A pipeline is written MLIR style, passes separated by commas, options in braces::

    fold-conv-bn,eliminate-dead-code,merge-convs{max_kernel=7,budget=0.7}

``parse_pipeline(text)`` checks every pass name and option against the registry and returns a
:class:`Pipeline`; ``str(pipeline)`` prints it back exactly as written (whitespace aside).
Errors point at the offending character with a caret, suggest close pass names, and list the
valid options of a pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphopt.errors import PipelineError, close_matches

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
    return cls


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
    hints = typing.get_type_hints(cls.Options)
    kind = hints.get(key, str)
    raw = _unquote(text)
    allowed = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
    try:
        if allowed:
            if raw not in [str(a) for a in allowed]:
                raise ValueError(f"expected one of {', '.join(map(str, allowed))}")
            return next(a for a in allowed if str(a) == raw)
        base = _base_type(kind)
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if base is type(None) and raw in ("none", "None"):
            return None
        return raw
    except ValueError as exc:
        raise PipelineError(
            f"bad value {text!r} for option {key!r} of pass {cls.name!r}: {exc}."
        ) from None


def _base_type(kind: Any) -> Any:
    """``int | None`` -> int; ``float`` -> float."""
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return str
    return kind


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

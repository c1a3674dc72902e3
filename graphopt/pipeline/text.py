"""Pipeline strings.

A pipeline is written MLIR style, passes separated by commas, options in braces::

    fold-conv-bn,eliminate-dead-code,merge-convs{max_kernel=7,budget=0.7}

``parse_pipeline(text)`` checks every pass name and option against the registry and returns a
:class:`Pipeline`; ``str(pipeline)`` prints it back exactly as written (whitespace aside).
Errors point at the offending character with a caret, suggest close pass names, and list the
valid options of a pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graphopt._util import close_matches
from graphopt.core.options import convert_option, option_fields
from graphopt.core.registry import PASS_NAME, get_pass, registered_passes
from graphopt.errors import PipelineError

if TYPE_CHECKING:
    from graphopt.core.pass_infra import Pass

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
        values = {key: convert_option(cls, key, text) for key, text in self.options}
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
        passes = registered_passes()
        while True:
            name, name_pos = self.match(PASS_NAME, "a pass name (kebab-case, e.g. fold-conv-bn)")
            if name not in passes:
                raise self.error(f"unknown pass {name!r}." + close_matches(name, passes), name_pos)
            options: list[tuple[str, str]] = []
            self.skip_ws()
            if self.peek() == "{":
                self.pos += 1
                fields = option_fields(passes[name])
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
                        convert_option(passes[name], key, text)
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

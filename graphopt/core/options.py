"""Pass options: frozen dataclasses whose values are checked where they are made.

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
import math
import numbers
import re
import typing
from typing import TYPE_CHECKING, Any

from graphopt._util import close_matches
from graphopt.errors import PipelineError

if TYPE_CHECKING:
    from graphopt.core.pass_infra import Pass


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


def convert_option(cls: type[Pass], key: str, text: str) -> Any:
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

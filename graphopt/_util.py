"""Small helpers shared across graphopt: error-message pieces and the cache folder.

Imports nothing from graphopt, so that every module (``errors`` included) may import it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path

VERSION = "0.1.0"  # graphopt's (pyproject.toml says the same)


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message, for a one-line error or log message.

    Without ``with_type`` an empty message gives the type name; with it, the line is prefixed
    ``TypeName: `` (and stays ``TypeName: `` when the message is empty).
    """
    lines = str(exc).strip().splitlines()
    if with_type:
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return lines[0] if lines else type(exc).__name__


def close_matches(word: str, choices: Iterable[str]) -> str:
    """A 'did you mean ...?' suffix for an error message, or '' when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def cache_dir() -> Path:
    """graphopt's cache folder: ``$GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt``,
    else ``~/.cache/graphopt``. Not created here."""
    env = os.environ.get("GRAPHOPT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graphopt"

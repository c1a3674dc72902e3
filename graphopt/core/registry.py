"""The one pass registry: ``@register_pass`` makes a pass available to pipeline strings.

graphopt's own passes, and any package's, are found through the ``graphopt.passes`` entry-point
group (graphopt declares its built-in passes there in pyproject.toml), so the registry never
imports a pass module by name.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
from typing import TYPE_CHECKING, Any

from graphopt._util import close_matches, first_line
from graphopt.core.options import check_options
from graphopt.errors import PipelineError

if TYPE_CHECKING:
    from graphopt.core.pass_infra import Pass

_REGISTRY: dict[str, type[Pass]] = {}

PASS_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipeline strings under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not PASS_NAME.fullmatch(name or ""):
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


ENTRY_POINT_GROUP = "graphopt.passes"
_plugins_loaded = False


def load_plugins() -> None:
    """Import, once, every module the ``graphopt.passes`` entry-point group names, so that their
    ``@register_pass`` decorators run: graphopt's built-in passes (declared in graphopt's own
    pyproject.toml) and any installed package's."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin gets a clear error, not a trace
            _plugins_loaded = False
            dist = entry.dist.name if entry.dist else "an unknown package"
            raise PipelineError(
                f"the pass plugin {entry.name!r} ({entry.value}, from {dist}) failed to import: "
                f"{first_line(exc)}. Fix or uninstall that package."
            ) from exc
    if not any(cls.__module__.startswith("graphopt.passes.") for cls in _REGISTRY.values()):
        raise PipelineError(
            "graphopt's built-in passes are not registered: graphopt is imported from a source "
            "tree that is not installed. Install it with `pip install -e .`."
        )


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes by name (graphopt's and every installed plugin's)."""
    load_plugins()
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

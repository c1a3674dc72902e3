"""One exception hierarchy for graphopt.

Every message says what was measured or found, what was expected, and what to do about it.

    GraphoptError
    ├── CaptureError        the model could not be turned into a graph (tracing, ONNX import)
    ├── PipelineError       a pipeline string is malformed, names an unknown pass or option
    ├── TargetError         a target string is not understood
    ├── InputError          inputs of the wrong number, shape or dtype
    ├── PassError           a pass raised; carries the pass's position and a reproducer path
    ├── VerificationError   a rewrite, the capture or the artifact broke its numeric contract
    ├── BackendError        ONNX Runtime / TVM failures, chained ``from`` the original
    ├── ArgumentError       an argument of the wrong type or an impossible value
    └── InternalError       an unexpected failure inside graphopt (a bug), chained
"""

from __future__ import annotations

from graphopt._util import first_line


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class CaptureError(GraphoptError):
    """The model could not be captured as an FX graph (or an ONNX file could not be imported)."""


class PipelineError(GraphoptError):
    """A pipeline string or pass option is invalid."""


class TargetError(GraphoptError):
    """A target string is not understood."""


class InputError(GraphoptError):
    """Inputs do not match what the model was optimized for."""


class PassError(GraphoptError):
    """A pass raised an exception while rewriting the graph."""

    def __init__(
        self,
        message: str,
        *,
        pass_name: str = "",
        position: int = -1,
        reproducer: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.position = position
        self.reproducer = reproducer


class VerificationError(GraphoptError):
    """A rewrite changed the model's outputs by more than its numeric contract allows."""

    def __init__(
        self,
        message: str,
        *,
        pass_name: str = "",
        output: str = "",
        measured: float = float("nan"),
        allowed: float = float("nan"),
        reproducer: str | None = None,
        stage: str = "",
    ) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.stage = stage  # "capture", "pass <name>", "pipeline", "export", "backend <name>"
        self.report = None  # the run's report, where optimize() got that far
        self.output = output
        self.measured = measured
        self.allowed = allowed
        self.reproducer = reproducer


class BackendError(GraphoptError):
    """A backend (ONNX Runtime, TVM) failed to export, compile or run the model."""


class ArgumentError(GraphoptError):
    """An argument of a graphopt call has the wrong type or an impossible value."""


class InternalError(GraphoptError):
    """Something failed that graphopt did not expect: a bug to report (the cause is chained)."""


def graphopt_errors_only(fn):  # type: ignore[no-untyped-def]
    """Decorate a public entry point so that only :class:`GraphoptError` escapes it.

    An unexpected exception becomes an :class:`InternalError` chained ``from`` the original,
    with a message that says where to look (a user callback's traceback, or a bug to report).
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kwargs)
        except GraphoptError:
            raise
        except Exception as exc:
            raise InternalError(
                f"{fn.__qualname__} failed unexpectedly: {type(exc).__name__}: "
                f"{first_line(exc)}. If the chained traceback ends in your own code (a metric "
                "or finetune callback, the model's forward), fix it there; otherwise this is a "
                "graphopt bug: please report it with the model and this message."
            ) from exc

    return wrapper

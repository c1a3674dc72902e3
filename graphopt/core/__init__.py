"""The pass contract every other layer builds on.

``pass_infra``: :class:`Pass`, :class:`PassContext`, :class:`PassResult`. ``numerics``: the
:class:`Numerics` a pass declares and :func:`compare`, which checks it. ``options``: how a pass's
``Options`` values are checked. ``registry``: ``@register_pass``. ``printing``: canonical IR.
``progress``: the progress line long phases print.
"""

from graphopt.core.numerics import Comparison, Numerics, compare
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import get_pass, register_pass, registered_passes

__all__ = [
    "Comparison",
    "Numerics",
    "Pass",
    "PassContext",
    "PassResult",
    "compare",
    "get_pass",
    "register_pass",
    "registered_passes",
]

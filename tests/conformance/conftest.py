"""Fixtures of the conformance suite: making timm importable here.

timm imports torchvision, and torchvision's PyPI wheel ships compiled ops (``_C.so``) built
against a CUDA torch. Against the CPU torch this project pins, ``_C.so`` does not load, and
torchvision's ``__init__`` then fails at ``torch.library.register_fake("torchvision::nms")``
with "operator torchvision::nms does not exist": the fake (meta) kernels of ``nms`` and
``qnms`` are registered unconditionally, every other op's only when the compiled ops loaded.
Defining the schemas of those two ops first (no kernel: calling them still fails, and neither
timm's classifiers nor graphopt call them) lets torchvision's pure-Python parts, which timm
uses, import. This is test code only: graphopt itself never touches torchvision.

The suite needs the ``conformance`` extra (``pip install -e '.[conformance]'``); without timm
its tests are skipped with a message naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import pytest
import torch

# the op schemas torchvision's import registers fake kernels for unconditionally
TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list[torch.library.Library] = []  # kept alive: a dropped Library unregisters


def define_torchvision_op_schemas() -> None:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` unless they exist (idempotent)."""
    if _LIBRARIES or "torchvision" in sys.modules:
        return
    missing = [s for s in TORCHVISION_OP_SCHEMAS if not _op_exists(s.split("(")[0])]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing:
        lib.define(schema)
    _LIBRARIES.append(lib)


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def import_timm() -> ModuleType:
    """timm, with torchvision's op schemas defined first; skips the test without the extra."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed: pip install -e '.[conformance]'")
    define_torchvision_op_schemas()
    return importlib.import_module("timm")


@pytest.fixture(scope="session")
def timm() -> ModuleType:
    return import_timm()

"""Targets: where the optimized model will run, and the default pipeline for each.

Accepted spellings::

    cpu                              this machine's CPU
    cuda, cuda:1                     an NVIDIA GPU (ONNX Runtime's CUDA provider / TVM cuda)
    llvm -mcpu=skylake-avx512        a TVM LLVM target string (CPU)
    android-arm64                    a phone: TVM cross-compiles for aarch64-linux-android
    aarch64-linux (or aarch64)       an aarch64 Linux board (-mtriple=aarch64-linux-gnu)
    llvm -mtriple=aarch64-linux-gnu  the same, spelled as a TVM target
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from graphopt.errors import TargetError, close_matches

_KINDS = ("cpu", "cuda", "llvm", "android-arm64", "aarch64-linux", "aarch64")
_MOBILE_TRIPLES = {
    "android-arm64": "aarch64-linux-android",
    "aarch64-linux": "aarch64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
}

# The default pipeline per device kind. Clean-ups first so folding sees plain conv->bn pairs;
# re-parameterization after folding (every conv+BN branch is then a conv with a bias); dead code
# last to drop what folding and merging left behind.
_DEFAULT = "remove-identity,fold-constants,fold-conv-bn,reparameterize,eliminate-dead-code"
DEFAULT_PIPELINES = {"cpu": _DEFAULT, "cuda": _DEFAULT, "mobile": _DEFAULT}


@dataclass(frozen=True)
class Target:
    """A parsed target. ``device`` is ``cpu``, ``cuda`` or ``mobile``."""

    kind: str
    device: str
    options: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    index: int = 0
    text: str = ""

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        if isinstance(text, Target):
            return text
        if not isinstance(text, str) or not text.strip():
            raise TargetError(
                f"a target is a string such as 'cpu', 'cuda' or "
                f"'llvm -mcpu=skylake-avx512', not {text!r}."
            )
        raw = text.strip()
        try:
            words = shlex.split(raw)
        except ValueError as exc:
            raise TargetError(f"cannot read target {raw!r}: {exc}.") from None
        head, rest = words[0], words[1:]
        options: dict[str, str] = {}
        for word in rest:
            m = re.fullmatch(r"-{1,2}([A-Za-z][\w-]*)(?:=(.+))?", word)
            if not m:
                raise TargetError(
                    f"target option {word!r} in {raw!r} is not of the form "
                    f"-key=value (e.g. 'llvm -mcpu=skylake-avx512')."
                )
            options[m.group(1)] = m.group(2) if m.group(2) is not None else "true"
        m = re.fullmatch(r"cuda(?::(\d+))?", head)
        if m:
            return cls("cuda", "cuda", options, int(m.group(1) or 0), raw)
        if head == "cpu":
            return cls("cpu", "cpu", options, 0, raw)
        if head == "llvm":
            triple = options.get("mtriple", "")
            device = "mobile" if triple.startswith(("aarch64", "arm")) else "cpu"
            return cls("llvm", device, options, 0, raw)
        if head in _MOBILE_TRIPLES:
            options.setdefault("mtriple", _MOBILE_TRIPLES[head])
            return cls(head, "mobile", options, 0, raw)
        raise TargetError(
            f"unknown target {head!r}."
            + close_matches(head, _KINDS)
            + " Known targets: cpu, cuda[:N], llvm [-mcpu=..] [-mtriple=..], "
            "android-arm64, aarch64-linux."
        )

    @property
    def default_pipeline(self) -> str:
        return DEFAULT_PIPELINES[self.device]

    def __str__(self) -> str:
        return self.text or self.kind

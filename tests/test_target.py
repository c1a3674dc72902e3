from __future__ import annotations

import pytest

from graphopt.errors import TargetError
from graphopt.target import Target


@pytest.mark.parametrize(
    "text, kind, device",
    [
        ("cpu", "cpu", "cpu"),
        ("cuda", "cuda", "cuda"),
        ("cuda:1", "cuda", "cuda"),
        ("llvm -mcpu=skylake-avx512", "llvm", "cpu"),
        ("llvm -mtriple=aarch64-linux-gnu -mattr=+neon", "llvm", "mobile"),
        ("android-arm64", "android-arm64", "mobile"),
    ],
)
def test_parse(text, kind, device):
    t = Target.parse(text)
    assert (t.kind, t.device, str(t)) == (kind, device, text)
    assert t.default_pipeline


def test_options_and_index():
    assert Target.parse("cuda:1").index == 1
    assert Target.parse("llvm -mcpu=skylake-avx512").options == {"mcpu": "skylake-avx512"}
    assert Target.parse("android-arm64").options["mtriple"] == "aarch64-linux-android"


@pytest.mark.parametrize(
    "text, message",
    [
        ("cpux", "unknown target 'cpux'. Did you mean 'cpu'"),
        ("gpu", "unknown target 'gpu'"),
        ("llvm mcpu=x", "is not of the form -key=value"),
        ("", "a target is a string"),
        (None, "a target is a string"),
        ("llvm -mcpu='x", "cannot read target"),
    ],
)
def test_bad_targets(text, message):
    with pytest.raises(TargetError, match=message.replace("(", r"\(")):
        Target.parse(text)

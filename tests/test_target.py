from __future__ import annotations

import platform
import re

import pytest
import torch

import graphopt.target as target_module
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


# ------------------------------------------------------------------------------------------------
# -mcpu, -mtriple and the other options are checked, not silently built for the host


@pytest.mark.parametrize(
    "text, message",
    [
        ("llvm -mcpu=notacpu", "unknown -mcpu=notacpu in 'llvm -mcpu=notacpu'"),
        ("llvm -mcpu=skylake-avx51", "Did you mean 'skylake-avx512'"),
        ("cpu -mcpu=cortex-a53x", "unknown -mcpu=cortex-a53x"),
        ("android-arm64 -mcpu=skylake", "no such CPU for -mtriple=aarch64-linux-android"),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=znver3", "Valid CPUs: a64fx,"),
        ("llvm -mtriple=foo-bar-baz", "unsupported -mtriple=foo-bar-baz"),
        ("llvm -mtriple=riscv64gc-linux-gnu", "Did you mean 'riscv64'"),
        ("llvm -mtriple=nvptx64-nvidia-cuda", "Supported architectures: x86_64"),
        ("llvm -mtriple=", "is not of the form"),
        ("llvm -mcup=skylake", "Did you mean '-mcpu'? Valid options: -mcpu, -mattr"),
        ("cuda -mcpu=skylake", "Valid options: -arch"),
        ("llvm -num-cores=0", "-num-cores=0 in 'llvm -num-cores=0' is not a positive integer"),
        ("llvm -num-cores=four", "not a positive integer"),
        ("cuda -arch=80", "write it like -arch=sm_80"),
    ],
)
def test_bad_target_options_are_refused(text, message):
    with pytest.raises(TargetError, match=re.escape(message)):
        Target.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "llvm -mcpu=generic",
        "cpu -mcpu=x86-64-v3" if platform.machine() in ("x86_64", "AMD64") else "cpu",
        "llvm -mtriple=x86_64-linux-gnu -mcpu=skylake-avx512 -num-cores=4",
        "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76 -mattr=+neon",
        "llvm -mtriple=arm64-apple-macos -mcpu=apple-m4",
        "llvm -mtriple=armv7a-linux-gnueabihf -mcpu=cortex-a53",
        "llvm -mtriple=thumbv7em-none-eabi",
        "llvm -mtriple=riscv64-unknown-linux-gnu -mcpu=sifive-u74",
        "llvm -mtriple=i686-linux-gnu",
        "aarch64-linux -mcpu=neoverse-n1",
        "cuda:0 -arch=sm_90a",
    ],
)
def test_valid_cpus_and_triples_are_accepted(text):
    assert str(Target.parse(text)) == text


@pytest.fixture
def without_tvm(monkeypatch):
    monkeypatch.setattr(target_module, "_tvm_codegen", lambda: None)
    target_module._llvm_cpus.cache_clear()
    yield
    target_module._llvm_cpus.cache_clear()


def test_without_tvm_the_static_lists_serve(without_tvm):
    assert Target.parse("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76").options["mcpu"]
    with pytest.raises(TargetError, match="Did you mean 'cortex-a76'"):
        Target.parse("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76x")
    with pytest.raises(TargetError, match="unsupported -mtriple=foo-bar-baz"):
        Target.parse("llvm -mtriple=foo-bar-baz")
    # a family without a static list: LLVM decides when it builds
    assert Target.parse("llvm -mtriple=s390x-linux-gnu -mcpu=z15").options["mcpu"] == "z15"


def test_static_lists_agree_with_llvm():
    if target_module._tvm_codegen() is None:
        pytest.skip("TVM is not installed")
    target_module._llvm_cpus.cache_clear()
    for family, triple in [
        ("x86_64", "x86_64-linux-gnu"),
        ("aarch64", "aarch64-linux-gnu"),
        ("arm", "armv7a-linux-gnueabihf"),
        ("riscv64", "riscv64-unknown-linux-gnu"),
    ]:
        static = set(target_module._STATIC_CPUS[family])
        llvm = set(target_module.llvm_cpus(triple))
        assert static <= llvm, sorted(static - llvm)  # a newer LLVM may add names


def test_inputs_passed_as_the_target_get_a_short_message_with_the_fix():
    big = (torch.randn(1, 3, 64, 64),)
    with pytest.raises(TargetError, match=r"pass the inputs as example_inputs=") as info:
        Target.parse(big)
    assert len(str(info.value)) < 300  # not the tensor's pages

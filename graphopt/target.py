"""Targets: where the optimized model will run, and the default pipeline for each.

Accepted spellings::

    cpu                              this machine's CPU
    cuda, cuda:1                     an NVIDIA GPU (ONNX Runtime's CUDA provider / TVM cuda)
    llvm -mcpu=skylake-avx512        a TVM LLVM target string (CPU)
    android-arm64                    a phone: TVM cross-compiles for aarch64-linux-android
    aarch64-linux (or aarch64)       an aarch64 Linux board (-mtriple=aarch64-linux-gnu)
    llvm -mtriple=aarch64-linux-gnu  the same, spelled as a TVM target

Options are checked when the string is parsed, so that nothing is silently built for the host:
an option the backends do not read, an ``-mtriple`` whose architecture is not a CPU that TVM's
LLVM compiles for, an ``-mcpu`` LLVM does not know for that triple (the host's triple when none
is given) and a ``-num-cores`` that is not a positive integer are :class:`TargetError`. The CPU
names come from LLVM through TVM when TVM is installed (imported only for a target string that
names ``-mcpu`` or ``-mtriple``), else from LLVM 22's lists kept below.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import platform
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt._util import close_matches
from graphopt.errors import TargetError

logger = logging.getLogger(__name__)

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
            hint = (
                " (optimize's second positional argument is the target: pass the inputs as "
                "example_inputs=...)"
                if not isinstance(text, str | type(None))
                else ""
            )
            raise TargetError(
                f"a target is a string such as 'cpu', 'cuda' or "
                f"'llvm -mcpu=skylake-avx512', not {_short(text)}{hint}."
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
            _check_options(raw, "cuda", options)
            return cls("cuda", "cuda", options, int(m.group(1) or 0), raw)
        if head == "cpu":
            _check_options(raw, head, options)
            return cls("cpu", "cpu", options, 0, raw)
        if head == "llvm":
            _check_options(raw, head, options)
            triple = options.get("mtriple", "")
            device = "mobile" if triple.startswith(("aarch64", "arm")) else "cpu"
            return cls("llvm", device, options, 0, raw)
        if head in _MOBILE_TRIPLES:
            options.setdefault("mtriple", _MOBILE_TRIPLES[head])
            _check_options(raw, head, options)
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


# ------------------------------------------------------------------------------------------------
# checking -mcpu, -mtriple and the other options

# the options the backends read (graphopt.backends.tvm.tvm_target); any other is ignored there
_OPTIONS = {"cuda": ("arch",), "llvm": ("mcpu", "mattr", "mtriple", "num-cores")}

# CPU architectures (LLVM's spelling of a triple's first part) graphopt compiles for, by family
_ARCHES = [
    (r"x86_64|amd64|x86_64h", "x86_64"),
    (r"i[3-6]86", "i386"),
    (r"aarch64|arm64|arm64e", "aarch64"),
    (r"aarch64_be", "aarch64_be"),
    (r"arm(v[4-9](\.[0-9])?[a-z]*)?", "arm"),
    (r"arm(v[4-9](\.[0-9])?[a-z]*)?eb", "armeb"),
    (r"thumb(v[4-9](\.[0-9])?[a-z]*)?", "thumb"),
    (r"riscv64|riscv32", None),  # exact: LLVM knows no 'riscv64gc'
    (r"powerpc64le|powerpc64|ppc64le|ppc64", "powerpc64"),
    (r"loongarch64|s390x|mips64el|mips64", None),
]
_ARCH_EXAMPLES = (
    "x86_64, i686, aarch64 (arm64), arm/armv7a/armv8l, thumbv7, riscv64, riscv32, "
    "powerpc64le, loongarch64, s390x"
)


def _check_options(raw: str, kind: str, options: dict[str, str]) -> None:
    known = _OPTIONS["cuda" if kind == "cuda" else "llvm"]
    for key in options:
        if key not in known:
            raise TargetError(
                f"target option -{key} in {raw!r} is not one graphopt passes on for a "
                f"{'cuda' if kind == 'cuda' else 'CPU'} target (it would be ignored)."
                + close_matches(f"-{key}", [f"-{k}" for k in known])
                + " Valid options: "
                + ", ".join(f"-{k}" for k in known)
                + "."
            )
    if "num-cores" in options and not re.fullmatch(r"[1-9][0-9]*", options["num-cores"]):
        raise TargetError(
            f"-num-cores={options['num-cores']} in {raw!r} is not a positive integer; "
            "give the number of cores to use, e.g. -num-cores=4."
        )
    if "arch" in options and not re.fullmatch(r"sm_[0-9]+[a-z]?", options["arch"]):
        raise TargetError(
            f"-arch={options['arch']} in {raw!r} is not a CUDA architecture; write it like "
            "-arch=sm_80 (the GPU's compute capability without the dot)."
        )
    triple = options.get("mtriple")
    if triple is not None:
        _check_triple(raw, triple)
    if "mcpu" in options:
        _check_cpu(raw, options["mcpu"], triple)


def arch_family(triple: str) -> str | None:
    """The LLVM CPU family of a target triple (``armv7a-linux-gnueabihf`` -> ``arm``), or None
    when graphopt does not compile for that architecture."""
    arch = triple.split("-", 1)[0].lower()
    for pattern, family in _ARCHES:
        if re.fullmatch(pattern, arch):
            return family or arch
    return None


def _check_triple(raw: str, triple: str) -> None:
    family = (
        arch_family(triple) if re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", triple) else None
    )
    codegen = _tvm_codegen()
    # llvm_is_valid_cpu is safe on any triple (building a target for an unknown one crashes)
    if family is not None and codegen is not None:
        try:
            if not codegen.llvm_is_valid_cpu("generic", triple):
                family = None
        except Exception as exc:  # an older TVM without it: the family check stands
            logger.debug("llvm_is_valid_cpu failed: %s", exc)
    if family is None:
        arch = triple.split("-", 1)[0]
        raise TargetError(
            f"unsupported -mtriple={triple} in {raw!r}: architecture {arch!r} is not a CPU "
            "TVM's LLVM compiles for."
            + close_matches(arch, ["x86_64", "aarch64", "arm", "armv7a", "riscv64", "i686"])
            + f" Supported architectures: {_ARCH_EXAMPLES}. Write the full triple, e.g. "
            "-mtriple=aarch64-linux-gnu or -mtriple=armv7a-linux-gnueabihf."
        )


def _check_cpu(raw: str, cpu: str, triple: str | None) -> None:
    names = llvm_cpus(triple)
    if names is None or cpu in names:  # no list for this family: LLVM decides
        return
    where = f"-mtriple={triple}" if triple else f"this machine ({_host_triple()})"
    host = _host_cpu() if not triple else ""
    raise TargetError(
        f"unknown -mcpu={cpu} in {raw!r}: LLVM has no such CPU for {where}."
        + close_matches(cpu, names)
        + (f" This machine's CPU is {host!r}." if host else "")
        + " Leave -mcpu out to build for this machine's CPU (or a generic one when "
        "cross-compiling). Valid CPUs: " + ", ".join(names) + "."
    )


def llvm_cpus(triple: str | None = None) -> list[str] | None:
    """The ``-mcpu`` names LLVM accepts for ``triple`` (this machine's when None): LLVM's own
    list through TVM when it is installed, else LLVM 22's list for the triple's family, or None
    when there is no list for that family."""
    return _llvm_cpus(triple or "")


@functools.cache
def _llvm_cpus(triple: str) -> list[str] | None:
    codegen = _tvm_codegen()
    if codegen is not None:
        try:
            import tvm

            spec: dict[str, Any] = {"kind": "llvm"}
            if triple:
                spec["mtriple"] = triple
            names = sorted(set(codegen.llvm_get_cpu_archlist(tvm.target.Target(spec))))
            if names:
                return names
        except Exception as exc:  # fall back on the static lists
            logger.debug("TVM could not list LLVM CPUs for %r: %s", triple, exc)
    family = arch_family(triple or _host_triple())
    if family in ("i386", "x86_64"):
        family = "x86_64"
    elif family in ("arm", "armeb", "thumb"):
        family = "arm"
    elif family == "aarch64_be":
        family = "aarch64"
    return _STATIC_CPUS.get(family or "")


@functools.cache
def _tvm_codegen() -> Any:
    """``tvm.target.codegen`` when TVM is installed and works, else None."""
    try:
        if importlib.util.find_spec("tvm") is None:
            return None
        import tvm.target.codegen as codegen

        codegen.llvm_get_targets()
        return codegen
    except Exception as exc:  # a broken TVM install: the static lists serve
        logger.debug("TVM not usable for target checks: %s", exc)
        return None


def _host_triple() -> str:
    codegen = _tvm_codegen()
    if codegen is not None:
        try:
            return str(codegen.llvm_get_system_triple())
        except Exception:  # the machine's name below serves as well
            pass
    return platform.machine().lower() or "x86_64"


def _host_cpu() -> str:
    codegen = _tvm_codegen()
    if codegen is not None:
        try:
            return str(codegen.llvm_get_system_cpu())
        except Exception:  # no name to offer
            pass
    return ""


# LLVM 22's CPU names per family (llvm_get_cpu_archlist), used when TVM is not installed
_STATIC_CPU_TEXT = {
    "x86_64": """
        alderlake amdfam10 arrowlake arrowlake-s arrowlake_s athlon athlon-4 athlon-fx athlon-mp
        athlon-tbird athlon-xp athlon64 athlon64-sse3 atom atom_sse4_2 atom_sse4_2_movbe barcelona
        bdver1 bdver2 bdver3 bdver4 bonnell broadwell btver1 btver2 c3 c3-2 cannonlake cascadelake
        clearwaterforest cooperlake core-avx-i core-avx2 core2 core_2_duo_sse4_1 core_2_duo_ssse3
        core_2nd_gen_avx core_3rd_gen_avx core_4th_gen_avx core_4th_gen_avx_tsx core_5th_gen_avx
        core_5th_gen_avx_tsx core_aes_pclmulqdq core_i7_sse4_2 corei7 corei7-avx diamondrapids
        emeraldrapids generic geode goldmont goldmont-plus goldmont_plus gracemont grandridge
        graniterapids graniterapids-d graniterapids_d haswell i386 i486 i586 i686 icelake-client
        icelake-server icelake_client icelake_server ivybridge k6 k6-2 k6-3 k8 k8-sse3 knl knm
        lakemont lunarlake meteorlake mic_avx512 nehalem nocona novalake opteron opteron-sse3
        pantherlake penryn pentium pentium-m pentium-mmx pentium2 pentium3 pentium3m pentium4
        pentium4m pentium_4 pentium_4_sse3 pentium_ii pentium_iii pentium_iii_no_xmm_regs
        pentium_m pentium_mmx pentium_pro pentiumpro prescott raptorlake rocketlake sandybridge
        sapphirerapids sierraforest silvermont skx skylake skylake-avx512 skylake_avx512 slm
        tigerlake tremont westmere wildcatlake winchip-c6 winchip2 x86-64 x86-64-v2 x86-64-v3
        x86-64-v4 yonah znver1 znver2 znver3 znver4 znver5
    """,
    "aarch64": """
        a64fx ampere1 ampere1a ampere1b ampere1c apple-a10 apple-a11 apple-a12 apple-a13 apple-a14
        apple-a15 apple-a16 apple-a17 apple-a7 apple-m4 apple-m5 c1-nano c1-premium c1-pro
        c1-ultra carmel cortex-a320 cortex-a34 cortex-a35 cortex-a510 cortex-a520 cortex-a520ae
        cortex-a53 cortex-a55 cortex-a57 cortex-a65 cortex-a65ae cortex-a710 cortex-a715
        cortex-a72 cortex-a720 cortex-a720ae cortex-a725 cortex-a73 cortex-a75 cortex-a76
        cortex-a76ae cortex-a77 cortex-a78 cortex-a78ae cortex-a78c cortex-r82 cortex-r82ae
        cortex-x1 cortex-x1c cortex-x2 cortex-x3 cortex-x4 cortex-x925 exynos-m3 exynos-m4
        exynos-m5 falkor fujitsu-monaka gb10 generic grace kryo neoverse-512tvb neoverse-e1
        neoverse-n1 neoverse-n2 neoverse-n3 neoverse-v1 neoverse-v2 neoverse-v3 neoverse-v3ae
        olympus oryon-1 saphira thunderx thunderx2t99 thunderx3t110 thunderxt81 thunderxt83
        thunderxt88 tsv110
    """,
    "arm": """
        arm1020e arm1020t arm1022e arm10e arm10tdmi arm1136j-s arm1136jf-s arm1156t2-s
        arm1156t2f-s arm1176jz-s arm1176jzf-s arm710t arm720t arm7tdmi arm7tdmi-s arm8 arm810 arm9
        arm920 arm920t arm922t arm926ej-s arm940t arm946e-s arm966e-s arm968e-s arm9e arm9tdmi
        cortex-a12 cortex-a15 cortex-a17 cortex-a32 cortex-a35 cortex-a5 cortex-a510 cortex-a53
        cortex-a55 cortex-a57 cortex-a7 cortex-a710 cortex-a72 cortex-a73 cortex-a75 cortex-a76
        cortex-a76ae cortex-a77 cortex-a78 cortex-a78ae cortex-a78c cortex-a8 cortex-a9 cortex-m0
        cortex-m0plus cortex-m1 cortex-m23 cortex-m3 cortex-m33 cortex-m35p cortex-m4 cortex-m52
        cortex-m55 cortex-m7 cortex-m85 cortex-r4 cortex-r4f cortex-r5 cortex-r52 cortex-r52plus
        cortex-r7 cortex-r8 cortex-x1 cortex-x1c cyclone ep9312 exynos-m3 exynos-m4 exynos-m5
        generic iwmmxt krait kryo mpcore mpcorenovfp neoverse-n1 neoverse-n2 neoverse-v1 sc000
        sc300 star-mc1 star-mc3 strongarm strongarm110 strongarm1100 strongarm1110 swift xscale
    """,
    "riscv64": """
        andes-45-series andes-a25 andes-a45 andes-ax25 andes-ax45 andes-ax45mpv andes-n45
        andes-nx45 generic generic-ooo generic-rv32 generic-rv64 mips-p8700 rocket rocket-rv32
        rocket-rv64 rp2350-hazard3 sifive-7-series sifive-e20 sifive-e21 sifive-e24 sifive-e31
        sifive-e34 sifive-e76 sifive-p450 sifive-p470 sifive-p550 sifive-p670 sifive-p870
        sifive-s21 sifive-s51 sifive-s54 sifive-s76 sifive-u54 sifive-u74 sifive-x280 sifive-x390
        spacemit-x60 syntacore-scr1-base syntacore-scr1-max syntacore-scr3-rv32
        syntacore-scr3-rv64 syntacore-scr4-rv32 syntacore-scr4-rv64 syntacore-scr5-rv32
        syntacore-scr5-rv64 syntacore-scr7 tt-ascalon-d8 veyron-v1 xiangshan-kunminghu
        xiangshan-nanhu
    """,
}
_STATIC_CPUS = {family: text.split() for family, text in _STATIC_CPU_TEXT.items()}


def _short(value: object) -> str:
    """``repr(value)`` cut to one readable line (a tensor passed by mistake prints pages)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else f"{text[:57]}... ({type(value).__name__})"


# ------------------------------------------------------------------------------------------------
# the host CPU

#: int8 dot-product instructions: with one of them, uint8 x int8 products sum in int32
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def host_cpu_info() -> tuple[str, frozenset[str]]:
    """This machine's CPU model name and flags from /proc/cpuinfo (Linux); elsewhere what
    ``platform`` says, with no flags."""
    cpu, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in (
                "",
                platform.machine(),
                platform.processor(),
            ):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return cpu, flags


def int8_pairs_saturate(target: Target) -> str:
    """Why int8 weights should be 7-bit for ``target``, or "": the target is this machine's CPU
    (``cpu``, no ``-mcpu``/``-mtriple``), an x86 CPU whose flags show no VNNI. Its int8 kernels
    (ONNX Runtime's fast ones, OpenVINO's) add each pair of uint8 x int8 products in saturating
    int16 (PMADDUBSW: 255 * 127 * 2 = 64770 > 32767); with weights in [-63, 63] no pair can
    saturate (255 * 63 * 2 = 32130)."""
    if target.device != "cpu" or target.options:
        return ""  # another device, or a named CPU this machine cannot inspect
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return ""
    _, flags = host_cpu_info()
    if not flags or flags & VNNI_FLAGS:
        return ""
    return (
        "this x86 CPU has no VNNI: its int8 kernels add pairs of uint8 x int8 products in "
        "saturating int16, which 7-bit weights never overflow (exact, and ONNX Runtime runs "
        "its fast kernels)"
    )

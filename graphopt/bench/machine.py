"""The machine a benchmark runs on: what it is (:func:`machine_info`) and how busy other
processes keep it (:class:`CpuProbe`, :func:`wait_idle`)."""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from graphopt.backends.measure import available_cores
from graphopt.target import host_cpu_info

#: other processes using more than this many cores while a model is timed: noted as noisy
BUSY = 0.25

#: the CPU flags machine_info reports (the instruction sets that decide conv and int8 speed)
ISA_FLAGS = frozenset(
    {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni"}
)


def machine_info() -> dict[str, Any]:
    """CPU model and flags of note, cores, library versions, date."""
    cpu, flags = host_cpu_info()
    try:
        import openvino

        ov_version: str | None = openvino.__version__
    except ImportError:
        ov_version = None
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": available_cores(),
        "logical_cpus": os.cpu_count(),
        "isa": sorted(f for f in flags if f in ISA_FLAGS),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": ov_version,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def wait_idle(deadline: float, say: Callable[[str], None], name: str) -> float:
    """Wait (until ``deadline``) for 2 s in a row with other processes under ``BUSY`` cores.

    Returns the seconds spent waiting for busy periods to end (0 when the first 2 s were quiet).
    """
    start = time.perf_counter()
    busy = False
    while time.perf_counter() < deadline:
        probe = CpuProbe()
        time.sleep(min(2.0, max(0.0, deadline - time.perf_counter())))
        other = probe.others()
        if other is None or other <= BUSY:
            break
        if not busy:
            say(f"{name}: other processes use {other:.1f} cores; waiting for them")
            busy = True
    return time.perf_counter() - start if busy else 0.0


class CpuProbe:
    """CPU used by other processes over an interval, in cores (from /proc/stat, Linux only)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.busy = self._busy()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        except (OSError, ValueError, IndexError):
            return None
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def others(self) -> float | None:
        busy = self._busy()
        wall = time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            return None
        own = time.process_time() - self.own
        return round(max(0.0, (busy - self.busy - own) / wall), 2)

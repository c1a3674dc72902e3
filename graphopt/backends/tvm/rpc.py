"""TVM RPC: run, time and tune compiled models on a remote device through an RPC tracker.

A remote device is an :class:`RpcDevice`: the address of an RPC tracker and the key its servers
registered under (``"host:port/key"``, e.g. ``"10.0.0.5:9190/android"``). Start the tracker with
``python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190`` and a server per device with
``python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY`` (on a phone: the ``tvm_rpc`` app).

- :func:`check_device` asks the tracker how many servers with the key are free.
- :func:`run_library` / :func:`measure_library` upload a Relax VM library exported with
  ``tvm.compile(mod, target).export_library(path)`` and run or time it remotely.
- :func:`meta_schedule_runner` gives MetaSchedule's ``RPCRunner`` for
  ``tvm.s_tir.meta_schedule.tune.tune_tasks(..., runner=...)`` (the TVM backend passes it when
  given ``rpc=``; builds stay on this machine, with
  :func:`graphopt.backends.tvm.tuner.persistent_builder`).
- :class:`LoopbackCluster` starts a tracker and servers on 127.0.0.1 (tests, local tuning).

TVM is imported inside the functions, so importing this module stays cheap. TVM's tracker needs
``tornado`` (``pip install tornado``), which apache-tvm does not install.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.backends.measure import Latency
from graphopt.errors import BackendError

if TYPE_CHECKING:
    import numpy as np

DEFAULT_KEY = "graphopt-loopback"


@dataclass(frozen=True)
class RpcDevice:
    """A remote device: the RPC tracker's address and the key its servers registered under."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_s: float = 60.0
    priority: int = 1

    def describe(self) -> str:
        """``host:port/key``, the form :meth:`parse` reads."""
        return f"{self.tracker_host}:{self.tracker_port}/{self.key}"

    def __str__(self) -> str:
        return self.describe()

    @classmethod
    def parse(cls, text: str) -> RpcDevice:
        """Read ``"host:port/key"`` (e.g. ``"127.0.0.1:9190/android"``)."""
        addr, slash, key = text.strip().partition("/")
        host, colon, port = addr.rpartition(":")
        if not (slash and colon and host and key and port.isdigit() and 0 < int(port) < 65536):
            raise BackendError(
                f"cannot read RPC device {text!r}: expected 'host:port/key' with a port in "
                "1..65535, e.g. '127.0.0.1:9190/android' (the tracker's address and the key "
                "its servers were started with)."
            )
        return cls(host, int(port), key)


# --- tracker queries -------------------------------------------------------------------------


def _tracker_summary(host: str, port: int, timeout_s: float) -> dict[str, Any]:
    """The tracker's summary dict (``queue_info``, ``server_info``); OSError if unreachable.

    Speaks the tracker protocol on our own socket: ``tvm.rpc.connect_tracker`` retries a refused
    connection for 60 s and has no read timeout.
    """
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise OSError(f"{host}:{port} answered, but is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        code, summary = base.recvjson(sock)
        if code != base.TrackerCode.SUCCESS:
            raise OSError(f"tracker {host}:{port} refused the summary request ({code})")
        return summary


def _server_counts(device: RpcDevice, timeout_s: float) -> tuple[int, int]:
    """(registered, free) servers with ``device.key``; BackendError if the tracker is down."""
    try:
        summary = _tracker_summary(device.tracker_host, device.tracker_port, timeout_s)
    except (OSError, ValueError) as exc:
        raise BackendError(
            f"cannot reach the RPC tracker at {device.tracker_host}:{device.tracker_port} "
            f"({exc}); start one with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 "
            f"--port {device.tracker_port}` or check the address."
        ) from exc
    registered = sum(
        1 for s in summary.get("server_info", []) if s.get("key") == f"server:{device.key}"
    )
    free = int(summary.get("queue_info", {}).get(device.key, {}).get("free", 0))
    return registered, free


def _no_device_message(device: RpcDevice) -> str:
    addr = f"{device.tracker_host}:{device.tracker_port}"
    return (
        f"no device with key {device.key!r} is registered at {addr}; start one with "
        f"`python -m tvm.exec.rpc_server --tracker {addr} --key {device.key}` "
        f"(on a phone: `tvm_rpc server --tracker {device.tracker_host}:{device.tracker_port} "
        f"--key {device.key}`)."
    )


def check_device(device: RpcDevice, timeout_s: float = 10.0) -> int:
    """How many servers registered under ``device.key`` are free right now (at least 1).

    Raises BackendError when the tracker is unreachable, when no server has that key, or when all
    of them are busy.
    """
    registered, free = _server_counts(device, timeout_s)
    if registered == 0 and free == 0:
        raise BackendError(_no_device_message(device))
    if free == 0:
        raise BackendError(
            f"all {registered} servers with key {device.key!r} at {device.tracker_host}:"
            f"{device.tracker_port} are busy; wait for their sessions to end or start more "
            f"with `python -m tvm.exec.rpc_server --tracker {device.tracker_host}:"
            f"{device.tracker_port} --key {device.key}`."
        )
    return free


# --- MetaSchedule ------------------------------------------------------------------------------


def meta_schedule_runner(
    device: RpcDevice,
    *,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 0,
    max_workers: int | None = None,
) -> Any:
    """A MetaSchedule ``RPCRunner`` measuring candidates on ``device``.

    Pass it as ``tune_tasks(..., runner=meta_schedule_runner(dev))`` (with
    ``builder=graphopt.backends.tvm.tuner.persistent_builder()``). ``max_workers`` (parallel
    measurements) defaults to the number of free servers, which :func:`check_device` checks.
    Each sample is the mean of ``number`` runs; ``repeat`` samples per candidate.
    """
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    if max_workers is None:
        max_workers = check_device(device)
    rpc_config = RPCConfig(
        tracker_host=device.tracker_host,
        tracker_port=device.tracker_port,
        tracker_key=device.key,
        session_priority=device.priority,
        session_timeout_sec=device.session_timeout_s,
    )
    evaluator_config = EvaluatorConfig(
        number=number, repeat=repeat, min_repeat_ms=min_repeat_ms, enable_cpu_cache_flush=False
    )
    return RPCRunner(rpc_config, evaluator_config, max_workers=max_workers)


# --- running an exported Relax library remotely ------------------------------------------------


@contextlib.contextmanager
def _remote_vm(
    lib_path: str | Path,
    inputs: Sequence[np.ndarray],
    device: RpcDevice,
    dev_type: str,
    entry: str,
) -> Iterator[tuple[Any, Any]]:
    """A Relax VM on the remote with ``entry``'s inputs set: yields ``(vm, remote_device)``.

    The session (and so the server) is released when the context exits.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise BackendError(
            f"no library at {lib_path}; export one with "
            "`tvm.compile(mod, target).export_library(path)`."
        )
    registered, free = _server_counts(device, timeout_s=10.0)
    if registered == 0 and free == 0:
        raise BackendError(_no_device_message(device))

    import tvm
    from tvm import relax, rpc

    where = device.describe()
    try:
        tracker = rpc.connect_tracker(device.tracker_host, device.tracker_port)
        remote = tracker.request(
            device.key, priority=device.priority, session_timeout=device.session_timeout_s
        )
    except (OSError, RuntimeError) as exc:  # TVM errors are RuntimeErrors
        raise BackendError(
            f"could not open an RPC session on {where} ({exc}); check the tracker with "
            f"`python -m tvm.exec.query_rpc_tracker --host {device.tracker_host} "
            f"--port {device.tracker_port}`."
        ) from exc
    try:
        try:
            remote.upload(str(lib_path))
            rlib = remote.load_module(lib_path.name)
        except Exception as exc:
            raise BackendError(
                f"could not upload or load {lib_path.name} on {where} ({exc}); the library must "
                "be compiled for the remote's target (e.g. `-mtriple=aarch64-linux-android` for "
                "a phone) and exported with `export_library` (with `ndk.create_shared` when "
                "cross-compiling)."
            ) from exc
        try:
            dev = remote.device(dev_type, 0)
            vm = relax.VirtualMachine(rlib, dev)
            args = [tvm.runtime.tensor(a, device=dev) for a in inputs]
            vm.set_input(entry, *args)
            vm.invoke_stateful(entry)
        except Exception as exc:
            raise BackendError(
                f"running {entry!r} of {lib_path.name} on {where} ({dev_type}) failed: {exc}. "
                "Check the inputs' number, shapes and dtypes, the entry name and that the "
                "library was compiled for this device type."
            ) from exc
        yield vm, dev
    finally:
        # The session (and so the server) is held until its last remote handle is gone, and
        # VirtualMachine.get_outputs leaves the VM in a reference cycle (a recursive closure):
        # drop ours and collect, or the server stays busy until the cyclic GC happens to run.
        vm = args = rlib = dev = remote = tracker = None  # noqa: F841
        gc.collect()


def flatten_outputs(value: Any) -> list[np.ndarray]:
    """A Relax VM's result (a tensor, or nested tuples/arrays of them) as a flat list of arrays,
    local or remote."""
    if hasattr(value, "numpy"):
        return [value.numpy()]
    if hasattr(value, "__len__") and not isinstance(value, str | bytes):
        return [arr for v in value for arr in flatten_outputs(v)]
    return [np.asarray(value)]


def run_library(
    lib_path: str | Path,
    inputs: Sequence[np.ndarray],
    device: RpcDevice,
    dev_type: str = "cpu",
    entry: str = "main",
) -> list[np.ndarray]:
    """Run ``entry`` of an exported Relax library on ``device``; its outputs, tuples flattened.

    ``lib_path`` is ``tvm.compile(mod, target).export_library(path)`` built for the remote;
    ``dev_type`` names the remote device (``"cpu"``, ``"cuda"``, ``"opencl"``, ``"vulkan"``...).
    """
    with _remote_vm(lib_path, inputs, device, dev_type, entry) as (vm, _):
        return flatten_outputs(vm.get_outputs(entry))


def measure_library(
    lib_path: str | Path,
    inputs: Sequence[np.ndarray],
    device: RpcDevice,
    *,
    dev_type: str = "cpu",
    number: int = 10,
    repeat: int = 5,
    min_repeat_ms: int = 0,
    entry: str = "main",
) -> Latency:
    """Time ``entry`` of an exported Relax library on ``device`` with the remote's own clock.

    Each of the ``repeat`` samples is the mean of ``number`` calls (more when a repeat would take
    less than ``min_repeat_ms``), so the network round trip is not timed.
    """
    with _remote_vm(lib_path, inputs, device, dev_type, entry) as (vm, dev):
        try:
            timer = vm.time_evaluator(
                "invoke_stateful", dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
            samples = [float(s) for s in timer(entry).results]
        except Exception as exc:
            raise BackendError(
                f"timing {entry!r} on {device.describe()} failed: {exc}. If the session timed "
                f"out, raise RpcDevice.session_timeout_s (now {device.session_timeout_s} s) or "
                "lower number/repeat."
            ) from exc
    return Latency.from_samples(samples)


# --- a local tracker and servers ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackCluster:
    """An RPC tracker and ``servers`` RPC servers on 127.0.0.1, as subprocesses.

    ``with LoopbackCluster(servers=2) as cluster: run_library(..., cluster.device)``. Entering
    waits (up to ``timeout_s``) until the tracker reports every server free; exiting terminates
    the processes (and their workers), killing whatever has not exited after a few seconds.
    """

    def __init__(self, key: str = DEFAULT_KEY, servers: int = 2, timeout_s: float = 60.0) -> None:
        if servers < 1:
            raise ValueError(f"servers must be at least 1, got {servers}")
        self.key = key
        self.servers = servers
        self.timeout_s = timeout_s
        self.port: int | None = None
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._logdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def device(self) -> RpcDevice:
        """The servers as an :class:`RpcDevice` (only while the cluster runs)."""
        if self.port is None:
            raise BackendError("the loopback cluster is not running; use it as `with ...:`.")
        return RpcDevice("127.0.0.1", self.port, self.key)

    @property
    def pids(self) -> list[int]:
        """Process ids of the tracker and servers; each leads a process group with its workers."""
        return [proc.pid for _, proc, _ in self._procs]

    def __enter__(self) -> LoopbackCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the tracker, then the servers; return once all servers are free."""
        if importlib.util.find_spec("tornado") is None:
            raise BackendError(
                "TVM's RPC tracker needs the tornado package; install it with "
                "`pip install tornado`."
            )
        self._logdir = tempfile.TemporaryDirectory(prefix="graphopt-rpc-")
        try:
            deadline = time.monotonic() + self.timeout_s
            port = _free_port()
            self._spawn(
                "rpc_tracker",
                ["--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
            )
            self.port = port
            # Start the servers right away: each imports TVM twice (its process and its popen
            # worker) before it connects, the tracker's start is shorter, so it usually listens
            # by then; a server that finds it not yet listening retries after 5 s.
            for _ in range(self.servers):
                first = _free_port()
                self._spawn(
                    "rpc_server",
                    [
                        "--tracker", f"127.0.0.1:{port}", "--key", self.key,
                        "--host", "127.0.0.1",
                        "--port", str(first), "--port-end", str(min(first + 100, 65536)),
                    ],
                )  # fmt: skip
            self.wait_ready(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the tracker reports all servers free (after a session, they re-register)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        self._wait(deadline, lambda: _server_counts(self.device, 2.0)[1] >= self.servers)

    def stop(self) -> None:
        """Terminate every process group started: SIGTERM, SIGKILL what is left after 3 s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for _, proc, _ in self._procs:
                if _group_alive(proc.pid):
                    _signal_group(proc, sig)
            if self._wait_gone(3.0):
                break
        self._procs.clear()
        self.port = None
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None

    def _wait_gone(self, timeout_s: float) -> bool:
        """Wait until no process of any group started is left (zombies included)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for _, proc, _ in self._procs:
                proc.poll()  # reap the leader; its orphaned workers are init's to reap
            if not any(_group_alive(proc.pid) for _, proc, _ in self._procs):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _spawn(self, module: str, args: list[str]) -> None:
        assert self._logdir is not None
        log = Path(self._logdir.name) / f"{module}-{len(self._procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"tvm.exec.{module}", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, workers included
            )
        self._procs.append((module, proc, log))

    def _wait(self, deadline: float, ready: Any) -> None:
        last: Exception | None = None
        while True:
            for name, proc, log in self._procs:
                if proc.poll() is not None:
                    raise BackendError(
                        f"{name} exited with code {proc.returncode} while starting the loopback "
                        f"RPC cluster; its output ends with:\n{_tail(log)}"
                    )
            try:
                if ready():
                    return
            except (OSError, BackendError) as exc:
                last = exc
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n} ---\n{_tail(log)}" for n, _, log in self._procs)
                raise BackendError(
                    f"the loopback RPC cluster (key {self.key!r}, {self.servers} servers) did "
                    f"not come up within {self.timeout_s:g} s (last error: {last}); raise "
                    f"timeout_s on a loaded machine. Process output:\n{tails}"
                )
            time.sleep(0.2)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # pgid == pid: started with start_new_session


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"

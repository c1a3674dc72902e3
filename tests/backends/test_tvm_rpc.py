"""TVM RPC on loopback: a tracker and two servers, remote runs and timing, tuning via RPCRunner."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from graphopt.backends.tvm.rpc import (  # noqa: E402
    LoopbackCluster,
    RpcDevice,
    check_device,
    measure_library,
    run_library,
)
from graphopt.errors import BackendError  # noqa: E402


def _target():
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
    )


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.fc(x))
        return y, y.sum(dim=-1)


def _relax_module(model: nn.Module, x: torch.Tensor):
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        return from_exported_program(torch.export.export(model, (x,)))


@pytest.fixture(scope="module")
def cluster():
    with LoopbackCluster(servers=2, timeout_s=90) as c:
        groups = c.pids
        assert len(groups) == 3  # tracker + 2 servers
        yield c
    for pgid in groups:  # each started its own process group: nothing of it may be left
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)


def test_check_device_counts_free_servers(cluster):
    cluster.wait_ready()
    assert check_device(cluster.device) == 2


def test_run_and_measure_library_remotely(cluster, tmp_path):
    torch.manual_seed(0)
    model, x = _TwoOutputs().eval(), torch.randn(4, 16)
    lib = tmp_path / "model.so"
    tvm.compile(_relax_module(model, x), target=_target()).export_library(str(lib))

    outs = run_library(lib, [x.numpy()], cluster.device)
    with torch.no_grad():
        expected = model(x)
    assert len(outs) == 2
    for got, want in zip(outs, expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)

    latency = measure_library(lib, [x.numpy()], cluster.device, number=5, repeat=3)
    assert latency.median_ms > 0 and latency.runs == 3


def test_optimize_tunes_runs_and_measures_through_the_rpc_device(cluster, tmp_path):
    """graphopt's own path: MetaSchedule's RPCRunner measures the candidates on the servers,
    the artifact's numbers are checked there, and its latency is measured there."""
    from graphopt import optimize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    cluster.wait_ready()
    result = optimize(
        model, "cpu", (x,), backend="tvm", trials=4, database=tmp_path / "db",
        rpc=cluster.device,
    )  # fmt: skip
    report = result.report
    assert report.tvm_tuning["trials_run"] >= 4
    assert report.tvm_tuning["failed_trials"] < report.tvm_tuning["trials_run"]
    assert any(t["status"] == "tuned" for t in report.tvm_tasks)
    assert report.artifact_error is not None and report.artifact_error.ok
    assert report.latency_optimized is not None and report.latency_optimized.median_ms > 0
    records = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    run_secs = [s for line in records for s in json.loads(line)[1][1] or []]
    assert run_secs and all(math.isfinite(float(s)) for s in run_secs)


def test_check_device_without_servers_says_how_to_start_one(cluster):
    dev = RpcDevice(cluster.device.tracker_host, cluster.device.tracker_port, "nobody-serves-this")
    with pytest.raises(BackendError, match=r"python -m tvm\.exec\.rpc_server --tracker"):
        check_device(dev, timeout_s=5)


def test_run_library_errors_say_what_to_do(cluster, tmp_path):
    with pytest.raises(BackendError, match="export_library"):
        run_library(tmp_path / "missing.so", [], cluster.device)
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a shared library")
    nobody = RpcDevice(cluster.device.tracker_host, cluster.device.tracker_port, "nobody")
    with pytest.raises(BackendError, match="no device with key 'nobody'"):
        run_library(junk, [], nobody)
    with pytest.raises(BackendError, match="could not upload or load junk.so"):
        run_library(junk, [], cluster.device)


def test_check_device_without_tracker_fails_fast():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError, match="cannot reach the RPC tracker"):
        check_device(RpcDevice("127.0.0.1", port, "x"), timeout_s=2)


def test_rpc_device_parse_round_trip_and_errors():
    dev = RpcDevice.parse("10.0.0.5:9190/android")
    assert dev == RpcDevice("10.0.0.5", 9190, "android")
    assert RpcDevice.parse(dev.describe()) == dev
    for bad in ("10.0.0.5:9190", "10.0.0.5/android", "host:port/key", ":9190/k", "h:70000/k"):
        with pytest.raises(BackendError, match="host:port/key"):
            RpcDevice.parse(bad)


def test_import_does_not_import_tvm():
    code = "import sys, graphopt.backends.tvm.rpc; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""The Backend and Artifact protocols every backend implements, and the backend registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from graphopt.backends import BACKENDS, Artifact, Backend, get_backend
from graphopt.errors import BackendError
from graphopt.testing import small_conv_net


def test_onnxruntime_backend_and_artifact_implement_the_protocols():
    backend = get_backend("onnxruntime", "cpu")
    assert isinstance(backend, Backend) and backend.name == "onnxruntime"
    assert backend.rpc is None and backend.without_tuning() is backend
    m, x = small_conv_net(0)
    artifact = backend.compile(m, (x,))
    assert isinstance(artifact, Artifact)
    assert artifact.rpc is None and not artifact.cross_compiled
    assert artifact.static_shape_reason is None and artifact.mobile_package is None


def test_tvm_backend_and_artifact_implement_the_protocols():
    pytest.importorskip("tvm", reason="the TVM backend needs pip install 'graphopt[tvm]'")
    backend = get_backend("tvm", "cpu")
    assert isinstance(backend, Backend) and backend.name == "tvm"
    assert backend.rpc is None and backend.without_tuning().trials == 0
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    artifact = backend.compile(model, (torch.randn(2, 4),))
    assert isinstance(artifact, Artifact)
    assert artifact.rpc is None and not artifact.cross_compiled
    assert artifact.static_shape_reason is None and artifact.mobile_package is None


def test_the_registry_names_every_backend_and_explains_an_unknown_one():
    assert set(BACKENDS) == {"onnxruntime", "tvm", "openvino"}
    with pytest.raises(BackendError, match=r"unknown backend 'tmv'.*Did you mean.*tvm"):
        get_backend("tmv", "cpu")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_backends_imports_no_runtime():
    code = (
        "import sys, graphopt.backends, graphopt.backends.tvm, graphopt.backends.tvm.worker\n"
        "from graphopt.backends.tvm import TVM_STATUSES\n"
        "heavy = {'torch', 'onnxruntime', 'tvm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_the_tvm_backend_without_tvm_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['tvm'] = None  # as if apache-tvm were not installed\n"
        "from graphopt.backends import get_backend\n"
        "from graphopt.backends.tvm import TVM_STATUSES  # the report's, no TVM needed\n"
        "from graphopt.errors import BackendError\n"
        "try:\n"
        "    get_backend('tvm', 'cpu')\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "pip install 'graphopt[tvm]'" in result.stdout

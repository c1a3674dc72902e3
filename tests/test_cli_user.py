"""The graphopt command on a user's own model, passes, metric and calibration data (issue 18)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from graphopt import zoo
from graphopt.cli import main
from graphopt.cli_model import option_docs, user_model
from graphopt.core import registry
from graphopt.core.registry import registered_passes

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def build():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 8, 8),)


def bare():
    return Net().eval()


def broken():
    raise RuntimeError("weights not found at /nowhere/net.pt\\nsecond line")


model = bare()
"""

# a pass that breaks numerics (it doubles the first conv's weight) and claims to be exact
BREAKING_PLUGIN = """
from graphopt import Numerics, Pass, PassResult, register_pass


@register_pass
class DoubleConv(Pass):
    name = "double-conv-{tag}"
    numerics = Numerics.exact()

    def run(self, gm, ctx):
        conv = next(m for m in gm.modules() if m.__class__.__name__ == "Conv2d")
        conv.weight.data.mul_(2)
        return PassResult(gm, modified=True)
"""

# a pass that records what the command gave it: calibration batches and the metric
RECORDING_PLUGIN = """
import json
import os

from graphopt import Pass, PassResult, register_pass


@register_pass
class RecordContext(Pass):
    name = "record-context-{tag}"

    def run(self, gm, ctx):
        batches = list(ctx.calibration_data or [])
        seen = {{
            "batches": [[list(x.shape) for x in b] for b in batches],
            "dtypes": sorted({{str(x.dtype) for b in batches for x in b}}),
            "metric": ctx.metric(lambda *a: None) if ctx.metric else None,
        }}
        with open(os.environ["RECORD_TO"], "w") as f:
            json.dump(seen, f)
        return PassResult(gm, modified=False)
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _graphopt(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graphopt", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture(autouse=True)
def _own_sys_path(monkeypatch):
    # the command puts a user's directory on sys.path; each test gets its own copy back
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_user_model_file_with_a_rolled_back_plugin_pass_and_its_repro_subprocess(tmp_path):
    """The issue's end-to-end case: file.py:factory, --plugin file.py whose pass breaks the
    numerics; it is rolled back and the repro.py it left reruns it in a fresh process."""
    _write(tmp_path / "net.py", NET)
    _write(tmp_path / "mypasses.py", BREAKING_PLUGIN.format(tag="sub"))
    run = _graphopt(
        "optimize",
        "net.py:build",
        "--plugin",
        "mypasses.py",
        "--pipeline",
        "fold-conv-bn,double-conv-sub",
        "--no-measure",
        "-q",
        "--json",
        "report.json",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    records = json.loads((tmp_path / "report.json").read_text())["records"]
    status = {r["name"]: r["status"] for r in records}
    assert status["fold-conv-bn"] == "ok" and status["double-conv-sub"] == "rolled-back"
    script = Path(run.stdout.split("reproducer: ")[1].split()[0])  # the report names it
    assert script.name == "repro.py" and script.is_file()
    # rerun from elsewhere: the script finds the plugin by itself and the failure reproduces
    again = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert again.returncode != 0
    assert "unknown pass" not in again.stderr
    assert "VerificationError: pass 'double-conv-sub'" in again.stderr
    assert "pass ran cleanly" not in again.stdout


def test_module_attribute_and_input_shape(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(pkg / "models.py", NET)
    monkeypatch.chdir(tmp_path)
    argv = ["optimize", "--no-measure", "-q", "--pipeline", "fold-conv-bn"]
    # an nn.Module attribute has no example inputs: --input-shape names forward's argument
    assert main([*argv, "userpkg.models:model", "--input-shape", "x:1x3x8x8"]) == 0
    out = capsys.readouterr().out
    assert "graphopt report: Net" in out and "folded" in out
    # a lone --input-shape may leave out the name; a factory's own inputs need none
    assert main([*argv, "userpkg.models:bare", "--input-shape", "1x3x8x8"]) == 0
    assert main([*argv, "userpkg.models:build"]) == 0
    capsys.readouterr()


def test_dtype_and_input_order_follow_forward(tmp_path):
    _write(
        tmp_path / "textnet.py",
        """
        import torch
        from torch import nn

        class TextNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, 4)

            def forward(self, input_ids, scale):
                return self.emb(input_ids) * scale
        """,
    )
    shapes = {"scale": [1, 1, 4], "input_ids": [1, 5]}  # flag order is not forward's order
    model, inputs, name = user_model(
        f"{tmp_path / 'textnet.py'}:TextNet", shapes, {"input_ids": torch.int64}
    )
    assert name == "TextNet"
    assert [(tuple(x.shape), x.dtype) for x in inputs] == [
        ((1, 5), torch.int64),
        ((1, 1, 4), torch.float32),
    ]
    assert model(*inputs).shape == (1, 5, 4)


def test_typed_inputs_and_dynamic_axes_reach_the_artifact(tmp_path, capsys):
    _write(
        tmp_path / "idsnet.py",
        """
        from torch import nn

        class IdsNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, 4)
                self.lin = nn.Linear(4, 2)

            def forward(self, input_ids):
                return self.lin(self.emb(input_ids))
        """,
    )
    out = tmp_path / "ids.onnx"
    argv = ["optimize", f"{tmp_path / 'idsnet.py'}:IdsNet", "--no-measure", "-q", "-o", str(out)]
    argv += ["--input-shape", "input_ids:1x5", "--dtype", "input_ids:int64"]
    assert main([*argv, "--dynamic-axes", "input_ids:0=batch,1=seq"]) == 0
    capsys.readouterr()
    (vi,) = onnx.load(out).graph.input
    dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    assert (vi.name, vi.type.tensor_type.elem_type, dims) == (
        "input_ids",
        onnx.TensorProto.INT64,
        ["batch", "seq"],
    )


def test_an_installed_packages_passes_need_no_plugin_flag(tmp_path, monkeypatch, capsys):
    """The graphopt.passes entry-point group: a package's passes load with graphopt's own."""
    net = _write(tmp_path / "epnet.py", NET)
    _write(tmp_path / "ep_passes.py", RECORDING_PLUGIN.format(tag="ep"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RECORD_TO", str(tmp_path / "seen.json"))
    real = importlib.metadata.entry_points
    ours = importlib.metadata.EntryPoint("ep", "ep_passes", registry.ENTRY_POINT_GROUP)

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        return [*found, ours] if kwargs.get("group") == registry.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    argv = ["optimize", f"{net}:build", "--pipeline", "record-context-ep", "--no-measure", "-q"]
    assert main(argv) == 0
    assert "record-context-ep" in capsys.readouterr().out
    assert json.loads((tmp_path / "seen.json").read_text())["batches"] == []


def test_user_code_errors_are_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    net = _write(tmp_path / "errnet.py", NET)
    _write(tmp_path / "nopasses.py", "X = 1\n")
    monkeypatch.chdir(tmp_path)
    cases = [
        ([str(tmp_path / "missing.py") + ":build"], "missing.py: no such file"),
        ([f"{net}:nothing"], "has no attribute 'nothing'"),
        ([f"{net}:broken"], "RuntimeError: weights not found at /nowhere/net.pt."),
        ([f"{net}:bare"], "add --input-shape for each input of forward() (x)"),
        ([str(net)], "the file defines"),
        ([f"{net}:model", "--input-shape", "y:1x3x8x8"], "forward() takes (x)"),
        ([f"{net}:build", "--dtype", "x:float99"], "--dtype 'x:float99'"),
        ([f"{net}:build", "--plugin", "nopasses.py"], "registered no pass"),
        ([f"{net}:build", "--plugin", "no_such_module_x"], "no module named"),
        ([f"{net}:build", "--metric", "errnet:Net.nothing"], "has no attribute"),
        (["digits_cnn", "--dtype", "int64"], "--dtype applies to a Python model"),
        (["digits_cnn", "--input-shape", "x:1x1x8x8"], "not a zoo one"),
    ]
    for argv, needle in cases:
        assert main(["optimize", *argv, "--no-measure", "-q"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("graphopt: error:") and err.count("\n") == 1, err
        assert needle in err, (needle, err)
    assert "second line" not in err  # the factory's first line only (checked on its case)


def test_calibration_and_metric_reach_every_pass(tmp_path, monkeypatch, capsys):
    """--calibration goes to optimize() without --int8 (as the model's input types: uint8
    samples become float32) and --metric module:fn is the context's metric."""
    net = _write(tmp_path / "calnet.py", NET)
    _write(tmp_path / "recordpass.py", RECORDING_PLUGIN.format(tag="cal"))
    _write(tmp_path / "scores.py", "def accuracy(predict):\n    return 0.75\n")
    data = tmp_path / "cal.npz"
    np.savez(data, np.zeros((5, 3, 8, 8), dtype=np.uint8))
    record = tmp_path / "seen.json"
    monkeypatch.setenv("RECORD_TO", str(record))
    monkeypatch.chdir(tmp_path)
    argv = ["optimize", f"{net}:build", "--plugin", "recordpass", "--no-measure", "-q"]
    argv += ["--pipeline", "record-context-cal", "--calibration", str(data)]
    assert main([*argv, "--calibration-batch", "2", "--metric", "scores:accuracy"]) == 0
    seen = json.loads(record.read_text())
    assert seen["batches"] == [[[2, 3, 8, 8]], [[2, 3, 8, 8]], [[1, 3, 8, 8]]]
    assert seen["dtypes"] == ["torch.float32"] and seen["metric"] == 0.75
    # one array per model input: a second one is refused before any work
    np.savez(data, np.zeros((5, 3, 8, 8)), np.zeros((5, 2)))
    assert main(argv) == 2
    assert "holds 2 arrays; the model takes 1 inputs" in capsys.readouterr().err


def test_passes_describe_every_option(capsys):
    assert main(["passes"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    options = [line for line in lines if line.startswith("option ")]
    expected = sum(
        len(dataclasses.fields(cls.Options))
        for cls in registered_passes().values()
        if dataclasses.is_dataclass(getattr(cls, "Options", None))
    )
    assert len(options) == expected > 20
    # each: name, type, default, then a description
    undocumented = [line for line in options if len(line.split(" = ", 1)[1].split("  ")) < 2]
    # graphopt's own passes; a pass a test registered in this process may leave one bare
    own = {
        f"option {f.name}:"
        for cls in registered_passes().values()
        if cls.__module__.startswith("graphopt.")
        and dataclasses.is_dataclass(getattr(cls, "Options", None))
        for f in dataclasses.fields(cls.Options)
    }
    undocumented = [line for line in undocumented if " ".join(line.split()[:2]) in own]
    assert not undocumented, undocumented
    assert "option include_linear: bool = True  Linear + BatchNorm1d" in "\n".join(lines)


def test_option_docs_from_metadata_or_the_line_comment():
    @dataclass(frozen=True)
    class Options:
        budget: float = field(default=0.5, metadata={"doc": "from metadata"})
        runs: int = 3  # from the comment
        plain: bool = True

    assert option_docs(Options) == {
        "budget": "from metadata",
        "runs": "from the comment",
        "plain": "",
    }


def test_zoo_lists_input_shapes_without_building_models(capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("graphopt zoo built a model")

    monkeypatch.setattr(zoo, "get", no_build)
    assert main(["zoo"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(zoo.names())
    assert "input 1x3x224x224" in rows["resnet18"]
    assert "input 1x1x128x128" in rows["sesr_m5"] and "super-resolution" in rows["sesr_m5"]
    assert "input 1x1x8x8" in rows["digits_cnn"]

"""The ONNX stage's IR (graphopt.quant.onnx_ir.ONNX): copy, validate, run, save, text, and the
pass manager's rollback and reproducer through it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from graphopt.backends.export import export_onnx
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import PassContext, PassResult
from graphopt.errors import PassError
from graphopt.pipeline import PassManager, Reproducer
from graphopt.quant.onnx_ir import ONNX
from graphopt.quant.onnx_passes import OnnxPass


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 16)
    return model, export_onnx(model, (x,)), x


def test_run_matches_the_model_and_copy_is_independent(mlp):
    model, proto, x = mlp
    (y,) = ONNX.run(proto, (x,))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    torch.testing.assert_close(y, model(x).detach(), rtol=1e-5, atol=1e-5)
    copy = ONNX.copy(proto)
    copy.graph.node[0].name = "changed"
    assert proto.graph.node[0].name != "changed"


def test_validate_names_what_is_wrong(mlp):
    _, proto, _ = mlp
    ONNX.validate(proto)
    broken = ONNX.copy(proto)
    broken.graph.node[-1].input[0] = "no_such_tensor"
    with pytest.raises(PassError, match="not valid ONNX"):
        ONNX.validate(broken)
    with pytest.raises(PassError, match="not an onnx.ModelProto"):
        ONNX.validate("a string")


def test_text_elides_large_constants_and_save_loads(mlp, tmp_path):
    _, proto, x = mlp
    text = ONNX.text(proto)
    assert "Gemm" in text and "{}" in text  # the 16x8 weight's values elided
    line = ONNX.save(proto, tmp_path)
    scope = {"here": Path(tmp_path)}
    exec(line, scope)
    assert scope["model"].SerializeToString() == proto.SerializeToString()


class ScaleWeight(OnnxPass):
    """Deliberately wrong: claims exactness while doubling the first weight."""

    name = "scale-weight"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        out = ONNX.copy(model)
        w = out.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
        return PassResult(out, True)


def test_a_broken_onnx_pass_is_rolled_back_with_a_reproducer(mlp, tmp_path):
    _, proto, x = mlp
    pm = PassManager([ScaleWeight()], ir=ONNX, instruments=[Reproducer(tmp_path)])
    result = pm.run(proto, PassContext(sample_inputs=(x,)))
    record = result.records[0]
    assert record.status == "rolled-back" and not record.comparison.ok
    assert result.graph.SerializeToString() == proto.SerializeToString()
    repro = Path(record.reproducer)
    assert onnx.load(str(repro / "model.onnx")).SerializeToString() == proto.SerializeToString()
    script = (repro / "repro.py").read_text()
    assert "graphopt.quant.onnx_ir import ONNX" in script and "scale-weight" in script
    assert "Gemm" in (repro / "graph.ir").read_text()
    np.testing.assert_array_equal(
        torch.load(repro / "inputs.pt", weights_only=False)[0].numpy(), x.numpy()
    )

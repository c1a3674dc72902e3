"""Dynamic axes through the torch.export fallback: a model symbolic tracing cannot take (a
transformer whose forward branches on its sequence length, as Hugging Face's BERT does) keeps
the axes ``dynamic_axes`` names symbolic, in the captured graph and in the ONNX artifact.

torch.export's graph reads sizes with ``aten.sym_size.int``; the TorchScript exporter used to
record their ints as constants (the artifact failed at another batch); the export now traces
them as ``Shape`` ops. An axis the model fixes is a clear CaptureError, never a silent freeze.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.core.numerics import Numerics, compare
from graphopt.errors import CaptureError, InputError
from graphopt.frontends.torch import capture

AXES = {"ids": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}}


class TinyEncoder(nn.Module):
    """Embeddings + one attention layer + mean pooling over the mask, BERT's way: a position
    table sliced by the sequence length, heads by view(B, L, H, D), and a shape check."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, max_len: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.register_buffer("positions", torch.arange(max_len)[None])
        self.qkv, self.out, self.norm = (
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
        )
        self.heads, self.max_len = heads, max_len

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        if n > self.max_len:  # control flow on a shape: symbolic tracing fails here
            raise ValueError("sequence too long")
        x = self.tok(ids) + self.pos(self.positions[:, :n])
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        keep = mask[:, None, None, :].bool().expand(b, self.heads, n, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = self.norm(x + self.out(y.transpose(1, 2).reshape(b, n, -1)))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _model() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder().eval()


def _inputs(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):  # padded sentences of different lengths
        mask[i, max(1, length - i * 2) :] = 0
    return ids, mask


def test_the_fallback_keeps_the_named_axes_symbolic():
    cap = capture(_model(), _inputs(1, 8), dynamic_axes=AXES)
    assert cap.method == "torch.export"
    assert [s.shape for s in cap.inputs] == [("batch", "sequence")] * 2
    assert cap.dynamic_axes == AXES
    assert any("torch.export kept the dynamic axes symbolic" in n for n in cap.notes), cap.notes
    ids, mask = _inputs(3, 11)  # a batch of 1 in the example is not specialised either
    assert torch.allclose(cap.graph(ids, mask), _model()(ids, mask), atol=1e-6)


def test_without_dynamic_axes_the_fallback_stays_static_as_before():
    cap = capture(_model(), _inputs(2, 8))
    assert cap.method == "torch.export" and cap.dynamic_axes == {}
    assert any("could not keep the batch dynamic" in n for n in cap.notes)


def test_the_artifact_runs_at_other_lengths_in_plain_onnx_runtime(tmp_path):
    model = _model()
    result = graphopt.optimize(
        model, "cpu", example_inputs=_inputs(1, 8), dynamic_axes=AXES, measure=False
    )
    assert result.report.capture_method == "torch.export"
    path = result.save(tmp_path / "encoder.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * 2
    for batch, length in ((1, 8), (3, 5), (2, 23)):
        ids, mask = _inputs(batch, length, seed=length)
        with torch.no_grad():
            want = model(ids, mask)
        got = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
        error = compare([want], [torch.from_numpy(np.asarray(got))], Numerics.exact())
        assert error.ok, (batch, length, error.describe())


class FixedLength(TinyEncoder):
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] != 8:  # the model takes sentences of 8 tokens only
            raise ValueError("8 tokens expected")
        return super().forward(ids, mask)


def test_an_axis_the_model_fixes_is_a_capture_error_naming_it():
    model = FixedLength().eval()
    with pytest.raises(CaptureError) as info:
        capture(model, _inputs(2, 8), dynamic_axes=AXES)
    text = str(info.value)
    assert "could not keep the dynamic axes" in text and "ids[0: batch, 1: sequence]" in text
    assert "Leave the axis the model fixes out of dynamic_axes" in text
    only_batch = {"ids": {0: "batch"}, "mask": {0: "batch"}}
    cap = capture(model, _inputs(2, 8), dynamic_axes=only_batch)
    assert [s.shape for s in cap.inputs] == [("batch", 8)] * 2


def test_tvm_says_it_fixes_the_axes_and_refuses_other_sizes():
    pytest.importorskip("tvm")
    model = _model()
    result = graphopt.optimize(
        model,
        "cpu",
        example_inputs=_inputs(2, 8),
        dynamic_axes=AXES,
        measure=False,
        backend="tvm",
    )
    assert any(
        "tvm artifact compiles static shapes" in w and "batch=2, sequence=8" in w
        for w in result.report.warnings
    ), result.report.warnings
    assert result.report.artifact_error.ok
    with pytest.raises(InputError, match="should be"):
        result(*_inputs(2, 9))

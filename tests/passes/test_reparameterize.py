"""reparameterize: parallel summed branches -> one conv, exact, on the grid, at random and on
the train-time zoo networks; refusals leave the graph unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from graphopt import zoo
from graphopt.backends.export import export_onnx
from graphopt.core.numerics import compare
from graphopt.core.pass_infra import PassContext
from graphopt.frontends.onnx import import_onnx
from graphopt.frontends.torch import capture
from graphopt.passes.reparameterize import Reparameterize
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.report import op_counts
from graphopt.testing import assert_pass_preserves, randomize_bn, run_pass


class Branches(nn.Module):
    """sum of convs (kernel, padding) on x, plus an identity BN and/or x itself."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernels: list[tuple[tuple[int, ...], tuple[int, ...]]],
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        identity_bn: bool = False,
        identity: bool = False,
        dims: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.convs = nn.ModuleList(
            conv(c_in, c_out, k, stride=stride, padding=p, groups=groups, dilation=dilation)
            for k, p in kernels
        )
        self.bn = bn(c_in) if identity_bn else None
        if self.bn is not None:
            randomize_bn(self.bn, torch.Generator().manual_seed(seed))
        self.identity = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for c in self.convs[1:]:
            out = out + c(x)
        if self.bn is not None:
            out = out + self.bn(x)
        if self.identity:
            out = x + out
        return torch.relu(out)


def _x(c: int, dims: int = 2, batch: int = 2, size: int = 9) -> torch.Tensor:
    return torch.randn(batch, c, *([size] * dims))


def _count(gm, kind: type) -> int:
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)
    )


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "kernels",
    [
        [((3, 3), (1, 1)), ((1, 1), (0, 0))],  # RepVGG
        [((3, 3), (1, 1)), ((1, 3), (0, 1)), ((3, 1), (1, 0))],  # ACNet
        [((5, 5), (2, 2)), ((3, 3), (1, 1)), ((1, 1), (0, 0)), ((3, 3), (1, 1))],  # MobileOne-ish
    ],
    ids=["repvgg", "acnet", "mobileone"],
)
def test_grid_of_groups_strides_kernels(groups, stride, kernels):
    torch.manual_seed(groups * 10 + stride)
    identity_bn = stride == 1
    model = Branches(8, 8, kernels, stride=stride, groups=groups, identity_bn=identity_bn).eval()
    result = assert_pass_preserves(
        "reparameterize",
        model,
        (_x(8),),
        more_inputs=[(_x(8, batch=3, size=12),)],
        expect_modified=True,
    )
    gm, _ = run_pass("reparameterize", model, (_x(8),))
    assert _count(gm, nn.Conv2d) == 1 and _count(gm, nn.BatchNorm2d) == 0
    assert result.stats["collapsed"] == 1
    assert result.stats["branches-merged"] == len(kernels) + identity_bn


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_with_dilation_and_identity(dims):
    k3, k1 = (3,) * dims, (1,) * dims
    model = Branches(
        4, 4, [(k3, (2,) * dims), (k1, (0,) * dims)], dilation=2, identity=True, dims=dims
    ).eval()
    assert_pass_preserves("reparameterize", model, (_x(4, dims, size=7),), expect_modified=True)


def test_functional_convs_merge():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w3 = nn.Parameter(torch.randn(6, 6, 3, 3))
            self.w1 = nn.Parameter(torch.randn(6, 6, 1, 1))
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return F.conv2d(x, self.w3, self.b, padding=1) + F.conv2d(x, self.w1) + x

    result = assert_pass_preserves(
        "reparameterize", Functional().eval(), (_x(6),), expect_modified=True
    )
    assert result.stats["branches-merged"] == 3


def test_different_strides_are_refused_not_miscompiled():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 4, 1, stride=2)
            self.c = nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=1, groups=2)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x)

    result = assert_pass_preserves("reparameterize", Mixed().eval(), (_x(4, size=8),))
    assert result.stats.get("skipped:mismatch") == 1 and not result.modified


def test_kernels_without_a_common_centre_are_refused():
    # stride 2 on 8 pixels: a 3x3 (pad 1) and a 2x2 (pad 0) give the same 4x4 output, but the
    # even kernel has no centre tap to line up with the 3x3's
    model = Branches(4, 4, [((3, 3), (1, 1)), ((2, 2), (0, 0))], stride=2).eval()
    result = assert_pass_preserves("reparameterize", model, (_x(4, size=8),))
    assert result.stats.get("skipped:misaligned") == 1 and not result.modified


def test_reflect_padding_is_refused():
    model = Branches(4, 4, [((3, 3), (1, 1)), ((1, 1), (0, 0))]).eval()
    model.convs[0].padding_mode = "reflect"
    result = assert_pass_preserves("reparameterize", model, (_x(4),), expect_modified=False)
    assert result.stats.get("skipped:padding-mode") == 1


def test_branch_used_elsewhere_stays_out_of_the_merge():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            kept = self.c(x)
            return self.a(x) + self.b(x) + kept, kept * 2

    result = assert_pass_preserves("reparameterize", Shared().eval(), (_x(4),))
    assert result.stats["branches-merged"] == 2


def test_identity_beside_a_strided_conv_is_refused():
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1, stride=1)
            self.b = nn.Conv2d(4, 4, 3, padding=0)

        def forward(self, x):
            return self.a(x)[..., 1:-1, 1:-1] + self.b(x)

    # not a branch sum on one x: nothing to do, nothing changed
    assert_pass_preserves("reparameterize", Bad().eval(), (_x(4),), expect_modified=False)


@given(
    n_convs=st.integers(1, 4),
    kernel=st.lists(st.sampled_from([1, 3, 5]), min_size=4, max_size=4),
    groups=st.sampled_from([1, 2, 4]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    identity_bn=st.booleans(),
    identity=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_multi_branch_blocks(n_convs, kernel, groups, stride, dilation, identity_bn,
                                    identity, seed):  # fmt: skip
    torch.manual_seed(seed)
    kernels = [((k, k), (dilation * (k // 2),) * 2) for k in kernel[:n_convs]]
    with_identity = stride == 1
    model = Branches(
        4, 4, kernels, stride=stride, groups=groups, dilation=dilation,
        identity_bn=identity_bn and with_identity, identity=identity and with_identity, seed=seed,
    ).eval()  # fmt: skip
    branches = n_convs + (identity_bn and with_identity) + (identity and with_identity)
    result = assert_pass_preserves(
        "reparameterize", model, (_x(4, size=7),), expect_modified=branches >= 2
    )
    if branches >= 2:
        assert result.stats["collapsed"] == 1 and result.stats["convs"] == 1


class Sequential2(nn.Module):
    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, residual: bool = False) -> None:
        super().__init__()
        self.first, self.second, self.residual = first, second, residual

    def forward(self, x):
        y = self.second(self.first(x))
        return torch.relu(y + x if self.residual else y)


def test_sesr_collapsible_block_with_residual_becomes_one_conv():
    torch.manual_seed(0)
    block = Sequential2(nn.Conv2d(4, 16, 5, padding=2), nn.Conv2d(16, 4, 1), residual=True)
    result = assert_pass_preserves(
        "reparameterize", block.eval(), (_x(4),), more_inputs=[(_x(4, batch=1, size=13),)]
    )
    assert result.stats["collapsed-sequential"] == 1 and result.stats["collapsed"] == 1
    gm, _ = run_pass("reparameterize", block.eval(), (_x(4),))
    assert _count(gm, nn.Conv2d) == 1
    assert not any(n.op == "call_function" for n in gm.graph.nodes if "add" in str(n.target))


@pytest.mark.parametrize("groups", [1, 2])  # 4 groups: the dense merge costs more (refused)
def test_pointwise_then_kxk_without_padding_or_bias_is_exact(groups):
    torch.manual_seed(groups)
    unpadded = Sequential2(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=groups))
    assert_pass_preserves("reparameterize", unpadded.eval(), (_x(4),), expect_modified=True)
    no_bias = Sequential2(nn.Conv2d(4, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1))
    assert_pass_preserves("reparameterize", no_bias.eval(), (_x(4),), expect_modified=True)
    reflect = Sequential2(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    assert_pass_preserves("reparameterize", reflect.eval(), (_x(4),), expect_modified=True)


def test_bias_under_zero_padding_and_costly_merges_are_refused():
    torch.manual_seed(0)
    padded = Sequential2(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1))
    result = assert_pass_preserves("reparameterize", padded.eval(), (_x(4),), expect_modified=False)
    assert result.stats["skipped:bias-at-padding"] == 1
    bottleneck = Sequential2(nn.Conv2d(32, 4, 1), nn.Conv2d(4, 4, 3))
    result = assert_pass_preserves(
        "reparameterize", bottleneck.eval(), (_x(32),), expect_modified=False
    )
    assert result.stats["skipped:more-macs"] == 1


@pytest.mark.parametrize("constant_folding", [True, False])
def test_fires_on_the_onnx_export_of_a_train_time_network(tmp_path, constant_folding):
    from graphopt import optimize

    entry = zoo.get("repvgg_a0")
    path = tmp_path / "repvgg.onnx"
    torch.onnx.export(
        entry.model.eval(), entry.example_inputs, str(path), dynamo=False, opset_version=17,
        do_constant_folding=constant_folding, input_names=["x"], output_names=["y"],
    )  # fmt: skip
    result = optimize(path, "cpu", measure=False)
    record = next(r for r in result.report.records if r.spec == "reparameterize")
    assert record.status == "ok" and record.stats["collapsed"] == 22
    assert result.report.ops_after["Conv2d"] == 22 and "BatchNorm2d" not in result.report.ops_after
    assert result.report.artifact_error.ok


class TokenBN(nn.Module):
    """SLAB-style: BatchNorm1d over the features of (N, T, C) tokens, around Linears, and a
    per-feature scale and shift (layer-scale style) after the second one."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.bn_in = nn.BatchNorm1d(16)
        self.fc1 = nn.Linear(16, 32)
        self.bn_mid = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.gamma = nn.Parameter(torch.randn(16, generator=gen))
        self.beta = nn.Parameter(torch.randn(16, generator=gen))
        for bn in (self.bn_in, self.bn_mid):
            randomize_bn(bn, gen)

    def forward(self, x):
        h = self.bn_in(x.transpose(1, 2)).transpose(1, 2)
        h = self.bn_mid(self.fc1(h).transpose(-1, -2)).transpose(-1, -2)
        h = torch.relu(h)
        return self.fc2(h) * self.gamma + self.beta - 0.5


def test_batchnorm_and_affines_around_linears_fold_into_them():
    model = TokenBN().eval()
    x = torch.randn(2, 7, 16)
    result = assert_pass_preserves(
        "reparameterize", model, (x,), more_inputs=[(torch.randn(3, 5, 16),)]
    )
    gm, _ = run_pass("reparameterize", model, (x,))
    assert _count(gm, nn.BatchNorm1d) == 0 and _count(gm, nn.Linear) == 2
    assert result.stats["folded-affine"] == 5  # bn_in, bn_mid, * gamma, + beta, - 0.5
    ops = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert ops <= {torch.relu}, ops


def test_shared_linear_is_not_changed_for_one_use():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) * 3.0 + self.fc(x + 1.0)

    assert_pass_preserves(
        "reparameterize", Shared().eval(), (torch.randn(4, 8),), expect_modified=False
    )


# ------------------------------------------------------------------------------------------------
# DiverseBranchBlock, FastViT RepMixer, RepMLP, concatenation, affines after a conv

PIPE = "remove-identity,fold-constants,fold-conv-bn,reparameterize,eliminate-dead-code"


def _pipeline(model: nn.Module, inputs: tuple, pipeline: str = PIPE):
    """Run the passes of the default pipeline around reparameterize, strictly (a broken
    numeric contract raises), and return (result, reparameterize's record)."""
    captured = capture(model, inputs)
    result = PassManager(parse_pipeline(pipeline), strict=True).run(
        captured.graph, PassContext(sample_inputs=captured.example_inputs)
    )
    assert result.end_to_end.ok, result.end_to_end
    record = next(r for r in result.records if r.spec == "reparameterize")
    assert record.status == "ok"
    return result, record


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: BN, then pad with BN's output for a zero input (exactness of the
    1x1 -> kxk merge). ``reference``: the upstream in-place border writes; else pad-and-add."""

    def __init__(self, pad: int, channels: int, reference: bool) -> None:
        super().__init__()
        self.bn, self.pad, self.reference = nn.BatchNorm2d(channels), pad, reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn = self.bn
        v = (bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(
            bn.running_var + bn.eps)).view(1, -1, 1, 1)  # fmt: skip
        p = self.pad
        if not self.reference:
            return F.pad(out - v, [p] * 4) + v
        out = F.pad(out, [p] * 4)
        out[:, :, 0:p, :] = v
        out[:, :, -p:, :] = v
        out[:, :, :, 0:p] = v
        out[:, :, :, -p:] = v
        return out


class IdentityBasedConv1x1(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels // groups, 1, 1) * 0.3)
        eye = torch.zeros(channels, channels // groups, 1, 1)
        for i in range(channels):
            eye[i, i % (channels // groups)] = 1
        self.register_buffer("id_tensor", eye)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.id_tensor, None, 1, 0, 1, self.groups)


def _conv_bn2d(cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))  # fmt: skip


class DBB(nn.Module):
    """DiverseBranchBlock (DingXiaoH/DiverseBranchBlock), train-time, as upstream writes it."""

    def __init__(self, cin, cout, k, stride=1, groups=1, reference=True) -> None:
        super().__init__()
        p = k // 2
        self.dbb_origin = _conv_bn2d(cin, cout, k, stride, p, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(p, cout, reference))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = _conv_bn2d(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, p))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module(
                "conv1", nn.Conv2d(cin, internal, 1, groups=groups, bias=False)
            )
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(p, internal, reference))
        self.dbb_1x1_kxk.add_module(
            "conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False)
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.dbb_origin(x)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(x)
        out += self.dbb_avg(x)
        out += self.dbb_1x1_kxk(x)
        return torch.relu(out)


@pytest.mark.parametrize("reference", [True, False], ids=["setitem-pad", "pad-add"])
@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "groups"),
    [(4, 8, 3, 1, 1), (8, 8, 3, 2, 1), (8, 8, 5, 1, 2), (8, 8, 3, 1, 8), (8, 8, 3, 2, 8)],
)
def test_diverse_branch_block_collapses_to_one_conv(cin, cout, k, stride, groups, reference):
    torch.manual_seed(k + stride + groups)
    block = zoo.randomize_bn_stats_(DBB(cin, cout, k, stride, groups, reference)).eval()
    result, record = _pipeline(block, (_x(cin, size=10),))
    after = op_counts(result.graph)
    assert after["Conv2d"] == 1 and after["BatchNorm2d"] == 0 and after["AvgPool2d"] == 0
    assert after["add"] == 0 and after["pad"] == 0 and after["setitem"] == 0
    assert record.stats["convs"] == 1 and record.stats["collapsed"] == 1
    conv = next(m for m in result.graph.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (k, k) and conv.stride == (stride, stride) and conv.groups == groups


def test_pad_with_a_value_other_than_the_bias_is_refused():
    """1x1 -> pad(v) -> kxk is exact only when v is what the 1x1 gives for a zero input."""

    class WrongPad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(F.pad(self.a(x), [1, 1, 1, 1], value=0.5))

    torch.manual_seed(0)
    result = assert_pass_preserves("reparameterize", WrongPad().eval(), (_x(4),))
    assert result.stats["skipped:bias-at-padding"] == 1 and not result.modified


class RepMixer(nn.Module):
    """FastViT RepMixer, train-time: x + ls * (mixer(x) - norm(x)), mixer = depthwise kxk-BN
    + depthwise 1x1-BN + identity BN, norm = identity BN; then a large+small kernel pair."""

    def __init__(self, dim: int, k: int = 3) -> None:
        super().__init__()
        self.mixer_conv = _conv_bn2d(dim, dim, k, 1, k // 2, dim)
        self.mixer_scale = _conv_bn2d(dim, dim, 1, 1, 0, dim)
        self.mixer_skip = nn.BatchNorm2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(0.5 + torch.rand(dim, 1, 1))
        self.large = _conv_bn2d(dim, dim, 7, 2, 3, dim)
        self.small = _conv_bn2d(dim, dim, 3, 2, 1, dim)

    def forward(self, x):
        mixer = self.mixer_conv(x) + self.mixer_scale(x) + self.mixer_skip(x)
        x = x + self.layer_scale * (mixer - self.norm(x))
        return F.gelu(self.large(x) + self.small(x))


def test_fastvit_repmixer_and_large_small_kernels_become_depthwise_convs():
    torch.manual_seed(0)
    block = zoo.randomize_bn_stats_(RepMixer(8)).eval()
    result, record = _pipeline(block, (_x(8, size=12),))
    after = op_counts(result.graph)
    assert after["Conv2d"] == 2 and after["BatchNorm2d"] == 0
    assert after["add"] == after["sub"] == after["mul"] == 0
    assert record.stats["collapsed"] == 2 and record.stats["branches-merged"] == 7
    kernels = sorted(m.kernel_size for m in result.graph.modules() if isinstance(m, nn.Conv2d))
    assert kernels == [(3, 3), (7, 7)]
    assert all(m.groups == 8 for m in result.graph.modules() if isinstance(m, nn.Conv2d))


class RepMLPUnit(nn.Module):
    """RepMLP's partition perceptron (DingXiaoH/RepMLP): fc3 a grouped 1x1 conv over the
    flattened h x w partition, BN over channels, plus kxk conv-BN branches (groups = S)."""

    def __init__(self, c: int, h: int, w: int, s: int, ks=(1, 3), linear=False) -> None:
        super().__init__()
        self.c, self.h, self.w = c, h, w
        n = c * h * w
        self.fc3 = nn.Linear(n, n) if linear else nn.Conv2d(n, n, 1, groups=s)
        self.fc3_bn = nn.BatchNorm2d(c)
        self.convs = nn.ModuleList(_conv_bn2d(c, c, k, 1, k // 2, s) for k in ks)

    def forward(self, x):
        flat = x.reshape(-1, self.c * self.h * self.w) if isinstance(self.fc3, nn.Linear) else (
            x.reshape(-1, self.c * self.h * self.w, 1, 1))  # fmt: skip
        out = self.fc3_bn(self.fc3(flat).reshape(-1, self.c, self.h, self.w))
        for conv in self.convs:
            out = out + conv(x)
        return torch.relu(out)


@pytest.mark.parametrize(("groups", "linear"), [(1, False), (2, False), (4, False), (1, True)])
def test_repmlp_conv_branches_fold_into_the_fc(groups, linear):
    torch.manual_seed(groups)
    unit = zoo.randomize_bn_stats_(RepMLPUnit(8, 4, 4, groups, linear=linear)).eval()
    result, record = _pipeline(unit, (_x(8, size=4),))
    after = op_counts(result.graph)
    fcs = "Linear" if linear else "Conv2d"
    assert after[fcs] == 1 and after["BatchNorm2d"] == 0 and after["add"] == 0
    assert record.stats["merged-into-fc"] == 1 and record.stats["branches-merged"] == 2


def test_repmlp_convs_that_mix_the_fc_groups_are_refused():
    torch.manual_seed(0)
    unit = zoo.randomize_bn_stats_(RepMLPUnit(8, 4, 4, 2)).eval()
    unit.convs = nn.ModuleList([_conv_bn2d(8, 8, 3, 1, 1, 1)])  # dense conv, fc3 in 2 groups
    zoo.randomize_bn_stats_(unit)
    result, record = _pipeline(unit.eval(), (_x(8, size=4),))
    assert record.stats["skipped:fc-groups"] == 1 and op_counts(result.graph)["add"] == 1


def test_concatenated_convs_of_one_input_become_one_conv():
    class Inception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
            self.c = nn.Conv2d(4, 2, 1)  # another kernel size: stacking would add MACs

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)

    torch.manual_seed(0)
    result = assert_pass_preserves("reparameterize", Inception().eval(), (_x(4),))
    assert result.stats["merged-concat"] == 1 and result.stats["convs"] == 2
    gm, _ = run_pass("reparameterize", Inception().eval(), (_x(4),))
    assert sorted(m.out_channels for m in gm.modules() if isinstance(m, nn.Conv2d)) == [2, 8]


def test_per_channel_affines_after_a_conv_fold_into_it():
    class Affine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.register_buffer("s", 0.5 + torch.rand(6, 1, 1))
            self.register_buffer("t", torch.randn(1, 6, 1, 1))

        def forward(self, x):
            return torch.relu(2.0 - (self.conv(x) * self.s + self.t) / 3.0)

    torch.manual_seed(0)
    result = assert_pass_preserves(
        "reparameterize", Affine().eval(), (_x(4),), more_inputs=[(_x(4, batch=1),)]
    )
    assert result.stats["folded-affine"] == 4 and result.stats["convs"] == 1


# (convs, adds left: residuals around a non-linearity) of each train-time zoo network's deploy form
DEPLOY = {
    "repvgg_a0": (22, 0),
    "mobileone_s0": (43, 0),
    "dbb_resnet18": (20, 8),  # ResNet-18's 20 convs and 8 residual adds
    "acnet_resnet18": (20, 8),
    "fastvit_t": (49, 10),  # the ConvFFN residuals (GELU inside) stay
    "sesr_m5": (7, 2),  # the long residuals around the PReLU blocks stay
}


@pytest.mark.parametrize("source", ["torch", "onnx"])
@pytest.mark.parametrize("name", sorted(DEPLOY))
def test_train_time_zoo_networks_collapse_to_deploy_form(name, source):
    """Traced from torch, or imported from the ONNX export (BN already folded into the convs
    there by the exporter): the same deploy form either way."""
    entry = zoo.get(name)
    if source == "onnx":
        graph = import_onnx(export_onnx(entry.model, entry.example_inputs))
        before, model = op_counts(graph), graph
    else:
        before, model = op_counts(capture(entry.model, entry.example_inputs).graph), entry.model
    result, record = _pipeline(model, entry.example_inputs)
    after = op_counts(result.graph)
    convs, adds = DEPLOY[name]
    assert before["Conv2d"] + before["conv2d"] > convs  # there was something to collapse
    gelu_adds = after["erf"]  # ONNX writes GELU as x * 0.5 * (1 + erf(x / sqrt 2))
    assert after["Conv2d"] == convs and after["conv2d"] == 0 and after["add"] - gelu_adds == adds
    # (ONNX writes GELU and PReLU with Mul: only the torch graph has no mul left at all)
    for op in ("BatchNorm2d", "AvgPool2d", "avg_pool2d", "pad", "sub", "truediv"):
        assert after[op] == 0, op
    assert after["mul"] == 0 or source == "onnx"
    assert record.stats["convs"] == convs
    assert record.stats.get("collapsed", 0) + record.stats.get("collapsed-sequential", 0) > 0


# ------------------------------------------------------------------------------------------------
# issue 15: inference mode, in-place statements, float64


def _repvgg_block(c: int = 8) -> nn.Module:
    return Branches(c, c, [((3, 3), (1, 1)), ((1, 1), (0, 0))], identity_bn=True).eval()


def test_merges_under_inference_mode(under_inference_mode):
    """#15.1: under torch.inference_mode() the pass failed on every model (its float64 cache
    read the version counter, which inference tensors do not have) and was rolled back; now it
    merges, and the merged conv's parameters are normal tensors (the graph can be trained)."""
    result = under_inference_mode(Reparameterize(), _repvgg_block(), (_x(8),))
    assert result.stats["collapsed"] == 1 and result.stats["branches-merged"] == 3


def test_float64_cache_lives_for_one_run(monkeypatch):
    """The float64 copies of the weights are kept for one run of the pass, then dropped (a
    module-level cache keyed by id() could hand a new tensor an old tensor's copy): one memo,
    owned by the run, serves every conversion in it; the next run gets a new one; none outlives
    its run."""
    import gc
    import weakref

    from graphopt.fx.memo import RunMemo

    seen: list = []
    original = RunMemo.float64

    def spy(self, t):
        seen.append(weakref.ref(self))
        return original(self, t)

    monkeypatch.setattr(RunMemo, "float64", spy)
    run_pass("reparameterize", _repvgg_block(), (_x(8),))
    first, seen[:] = list(seen), []
    run_pass("reparameterize", _repvgg_block(), (_x(8),))
    gc.collect()
    assert first and all(ref is first[0] for ref in first)  # one memo (weakrefs are shared)
    assert seen and first[0] is not seen[0]
    assert first[0]() is None and seen[0]() is None  # dropped with its run


class UnusedInPlace(nn.Module):
    """A merged sum followed by an in-place statement whose result is not used."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.c3, self.c1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.op = op

    def forward(self, x):
        v = self.c3(x) + self.c1(x)
        if self.op == "mul_":
            v.mul_(-0.5)
        elif self.op == "relu_":
            torch.relu_(v)
        else:
            F.relu(v, inplace=True)
        return v


@pytest.mark.parametrize("op", ["mul_", "relu_", "inplace=True"])
def test_unused_in_place_statement_is_kept(op):
    """#15.3: the clean-up after a sweep (FX's dead-code elimination) deleted ``v.mul_(s)`` and
    ``torch.relu_(v)``: nothing reads their result, but their effect on ``v`` is the output."""
    torch.manual_seed(0)
    result = assert_pass_preserves(
        "reparameterize", UnusedInPlace(op).eval(), (_x(4),), expect_modified=True
    )
    assert result.stats["collapsed"] == 1


class WrittenBetween(nn.Module):
    """``x`` written in place between the reads of two convs that would merge."""

    def __init__(self, sequential: bool, write_first: bool = False, view: bool = False) -> None:
        super().__init__()
        self.c3, self.c1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.sequential, self.write_first, self.view = sequential, write_first, view

    def write(self, y):
        (y.flatten(1) if self.view else y).mul_(2.0)  # through a view: the same memory

    def forward(self, x):
        y = torch.relu(x)
        if self.write_first:
            self.write(y)  # before every read: every conv sees the written value
        a = self.c3(y)
        if not self.write_first:
            self.write(y)
        if self.sequential:
            return self.c1(a) + y
        return a + self.c1(y)


@pytest.mark.parametrize("view", [False, True], ids=["direct", "view"])
@pytest.mark.parametrize("sequential", [False, True], ids=["parallel", "sequential"])
def test_no_merge_through_a_value_written_in_place(sequential, view):
    """#15.3: merging ``conv3(y) + conv1(y)`` (or ``conv1(conv3(y))``) into one conv moves its
    reads of ``y`` after ``y.mul_(2)``: refused. Written before every read, it merges."""
    torch.manual_seed(0)
    model = WrittenBetween(sequential, view=view).eval()
    result = assert_pass_preserves("reparameterize", model, (_x(4),), expect_modified=False)
    assert result.stats["skipped:written-in-place"] >= 1
    result = assert_pass_preserves(
        "reparameterize",
        WrittenBetween(sequential, write_first=True, view=view).eval(),
        (_x(4),),
        expect_modified=True,
    )
    assert "skipped:written-in-place" not in result.stats


@pytest.mark.parametrize("kind", ["repvgg", "sequential", "affine-linear", "fc"])
def test_float64_models_merge_at_float64_precision(kind):
    """#15.9: the merged kernels were written through a float32 module (rounded to float32,
    then cast back), so float64 models missed float64's exact contract and were rolled back."""
    torch.manual_seed(0)
    if kind == "repvgg":
        model, x = _repvgg_block(), _x(8)
    elif kind == "sequential":
        model = Sequential2(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 1), residual=True)
        x = _x(4)
    elif kind == "affine-linear":
        model, x = TokenBN(), torch.randn(2, 5, 16)
    else:
        model, x = zoo.randomize_bn_stats_(RepMLPUnit(8, 4, 4, 2)), _x(8, size=4)
    model, x = model.double().eval(), x.double()
    gm, result = run_pass("reparameterize", model, (x,))
    assert result.modified
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert got.dtype == torch.float64
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_float64_graph_without_shape_annotations_keeps_its_dtype():
    """A graph without ``tensor_meta`` (traced, not captured): the merged conv takes its
    branches' dtype, not float32 (which would not run on float64 inputs)."""
    torch.manual_seed(0)
    model = _repvgg_block().double()
    gm = torch.fx.symbolic_trace(model)
    result = Reparameterize().run(gm, PassContext())
    assert result.stats["collapsed"] == 1
    x = _x(8).double()
    with torch.no_grad():
        want, got = model(x), result.graph(x)
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


# ------------------------------------------------------------------------------------------------
# weights, statistics or constants that forward writes in place are not merged (issue 15's class)


class _BufferTracer(fx.Tracer):
    proxy_buffer_attributes = True  # buffers as get_attr nodes (symbolic_trace freezes them)


class WrittenWeights(nn.Module):
    """One block per rule, whose forward also updates ``written`` (a parameter, a BN statistic
    or a constant) in place, as EMA weights, weight clipping or a hand-rolled statistics update
    do: ``parallel`` RepVGG (3x3 + 1x1 + identity BN), ``sequential`` 3x3 -> 1x1, ``affine``
    conv -> BN and conv * s, ``linear`` Linear * gamma, ``concat`` cat of two 3x3, ``fc`` RepMLP's
    FC beside conv branches, ``tokens`` SLAB's BatchNorm1d over tokens around Linears."""

    def __init__(self, block: str, written: str | None) -> None:
        super().__init__()
        self.block, self.written = block, written
        if block == "parallel":
            self.body = _repvgg_block(4)
        elif block == "sequential":
            self.body = Sequential2(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 1))
        elif block == "affine":
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.register_buffer("s", 0.5 + torch.rand(4, 1, 1))
            randomize_bn(self.bn, torch.Generator().manual_seed(1))
        elif block == "linear":
            self.fc = nn.Linear(8, 8)
            self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        elif block == "concat":
            self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        elif block == "tokens":
            self.body = TokenBN()
        else:
            self.body = zoo.randomize_bn_stats_(RepMLPUnit(4, 3, 3, 1))

    def forward(self, x):
        if self.block == "affine":
            y = self.bn(self.conv(x)) + self.conv2(torch.relu(x)) * self.s
        elif self.block == "linear":
            y = self.fc(x) * self.gamma
        elif self.block == "concat":
            y = torch.cat([self.a(x), self.b(x)], dim=1)
        else:
            y = self.body(x)
        if self.written is None:
            return y
        _attribute(self, self.written).data.mul_(0.9).add_(0.05)
        return y


def _attribute(obj, name: str):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


_WRITTEN = [
    ("parallel", "body.convs.0.weight"),
    ("parallel", "body.convs.1.bias"),
    ("parallel", "body.bn.running_mean"),
    ("parallel", "body.bn.weight"),
    ("sequential", "body.first.weight"),
    ("sequential", "body.second.bias"),
    ("affine", "bn.running_var"),
    ("affine", "conv.weight"),
    ("affine", "s"),
    ("linear", "fc.weight"),
    ("linear", "gamma"),
    ("tokens", "body.bn_in.running_mean"),
    ("tokens", "body.bn_mid.running_var"),
    ("concat", "a.weight"),
    ("fc", "body.fc3.weight"),
    ("fc", "body.fc3_bn.running_mean"),
]


def _twice(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x.clone()) for _ in range(2)]


def _written_input(block: str) -> torch.Tensor:
    if block in ("linear", "tokens"):
        return torch.randn(2, 8) if block == "linear" else torch.randn(2, 5, 16)
    return _x(4, size=3 if block == "fc" else 6)


@pytest.mark.parametrize(("block", "written"), _WRITTEN)
def test_tensor_written_in_place_in_forward_is_not_merged(block, written):
    """Merged, the second call used the first call's weights (RepVGG branches were off by 0.34,
    a sequential collapse by 0.12). Run twice (the state changes between calls), the graph agrees
    with the model; the written tensor is still read by the graph."""
    torch.manual_seed(0)
    model = WrittenWeights(block, written).eval()
    x = _written_input(block)
    gm = fx.GraphModule(model, _BufferTracer().trace(model))
    ShapeProp(gm).propagate(x.clone())  # shapes for the rules (runs forward once: writes too)
    want = _twice(copy.deepcopy(gm), x)
    written_tensor = _attribute(gm, written)
    result = Reparameterize().run(gm, PassContext(sample_inputs=(x,)))
    got = _twice(result.graph, x)
    for call, (w, g) in enumerate(zip(want, got, strict=True), 1):
        cmp = compare([w], [g], Reparameterize.numerics)
        assert cmp.ok, f"call {call}: {cmp.describe()}"
    assert result.stats["skipped:written-in-place"] >= 1, dict(result.stats)
    state = [*result.graph.parameters(), *result.graph.buffers()]
    assert any(t is written_tensor for t in state)


def test_written_branch_stays_out_and_the_others_merge():
    """RepVGG with its 3x3 written in place: the 1x1 and the identity BN still merge, the 3x3
    stays a conv of its own beside them (refused once)."""
    torch.manual_seed(0)
    model = WrittenWeights("parallel", "body.convs.0.weight").eval()
    gm = fx.symbolic_trace(model)
    result = Reparameterize().run(gm, PassContext())
    assert result.stats["collapsed"] == 1 and result.stats["branches-merged"] == 2
    assert result.stats["skipped:written-in-place"] == 1
    assert result.stats["convs"] == 2


@pytest.mark.parametrize(
    "block", ["parallel", "sequential", "affine", "linear", "tokens", "concat", "fc"]
)
def test_the_same_blocks_without_the_write_merge(block):
    """Without the write every rule fires: the refusals above are the write's."""
    torch.manual_seed(0)
    x = _written_input(block)
    model = WrittenWeights(block, None).eval()
    result = assert_pass_preserves("reparameterize", model, (x,), expect_modified=True)
    assert "skipped:written-in-place" not in result.stats


def test_weight_written_in_an_aten_graph_is_not_merged():
    """What torch.export makes of ``conv3(x) + conv1(x)`` with ``self.w1.add_(0.1)`` in forward
    (aten convs on get_attr weights), built by hand: the 1x1 stays apart, refused once."""
    torch.manual_seed(0)
    root = nn.Module()
    for name, shape in [("w3", (4, 4, 3, 3)), ("b3", (4,)), ("w1", (4, 4, 1, 1)), ("b1", (4,))]:
        root.register_parameter(name, nn.Parameter(torch.randn(shape)))
    graph = fx.Graph()
    x = graph.placeholder("x")
    get = {name: graph.get_attr(name) for name in ("w3", "b3", "w1", "b1")}
    conv2d = torch.ops.aten.conv2d.default
    c3 = graph.call_function(conv2d, (x, get["w3"], get["b3"], [1, 1], [1, 1]))
    c1 = graph.call_function(conv2d, (x, get["w1"], get["b1"]))
    y = graph.call_function(torch.ops.aten.add.Tensor, (c3, c1))
    graph.call_function(torch.ops.aten.add_.Tensor, (get["w1"], 0.1))
    graph.output(y)
    original, x = fx.GraphModule(root, graph), _x(4, size=6)
    want = _twice(copy.deepcopy(original), x)
    result = Reparameterize().run(copy.deepcopy(original), PassContext(sample_inputs=(x,)))
    got = _twice(result.graph, x)
    for call, (w, g) in enumerate(zip(want, got, strict=True), 1):
        cmp = compare([w], [g], Reparameterize.numerics)
        assert cmp.ok, f"call {call}: {cmp.describe()}"
    assert not result.modified and result.stats["skipped:written-in-place"] == 1


# ------------------------------------------------------------------------------------------------
# guards: timm's BatchNormAct2d reads its input's rank; that is no use of the conv's values


class _GuardedBN(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` (traced into): ``_assert(x.ndim == 4)``, then the BN."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class _GuardedRepVGG(nn.Module):
    """timm's RepVggBlock: conv3x3+BN, conv1x1+BN and an identity BN, each BN guarded."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv3, self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1)
        self.bn3, self.bn1, self.bn_id = _GuardedBN(c), _GuardedBN(c), _GuardedBN(c)
        gen = torch.Generator().manual_seed(3)
        for bn in (self.bn3, self.bn1, self.bn_id):
            randomize_bn(bn, gen)

    def forward(self, x):
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


def test_guarded_repvgg_block_collapses_to_one_conv():
    torch.manual_seed(0)
    block = nn.Sequential(_GuardedRepVGG(6), _GuardedRepVGG(6)).eval()
    result, record = _pipeline(block, (_x(6, size=8),))
    gm = result.graph
    assert record.stats["collapsed"] == 2 and record.stats["branches-merged"] == 6
    assert _count(gm, nn.Conv2d) == 2
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)
    # the merged-away convs are gone (not kept alive by their guards), every guard is kept
    assert sum(1 for n in gm.graph.nodes if n.target is torch._assert) == 6

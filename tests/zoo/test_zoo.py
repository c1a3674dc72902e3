"""Tests of graphopt.zoo: the built-in models and the digits data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from graphopt import zoo
from graphopt.errors import GraphoptError

ALL = [
    "acnet_resnet18",
    "dbb_resnet18",
    "digits_cnn",
    "fastvit_t",
    "mobilenetv2",
    "mobileone_s0",
    "repvgg_a0",
    "resnet18",
    "resnet50",
    "sesr_m5",
    "vit_s",
]
RANDOM = [n for n in ALL if n != "digits_cnn"]
WITH_BN = [n for n in ALL if n not in ("vit_s", "sesr_m5")]
# ONNX round trips of the big nets take a few seconds each; the small ones run by default.
ONNX_FAST = {"digits_cnn", "resnet18", "vit_s", "mobilenetv2", "sesr_m5"}
# name -> (input shape, output shape, task) where not (1, 3, 224, 224), (1, 1000), classification
SHAPES = {
    "digits_cnn": ((1, 1, 8, 8), (1, 10), "classification"),
    "sesr_m5": ((1, 1, 128, 128), (1, 1, 256, 256), "super-resolution"),
}
DEFAULT_SHAPES = ((1, 3, 224, 224), (1, 1000), "classification")


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_names() -> None:
    assert zoo.names() == ALL


@pytest.mark.parametrize("name", zoo.names())
def test_get_returns_eval_model_with_sane_outputs(name: str) -> None:
    m = zoo.get(name)
    in_shape, out_shape, task = SHAPES.get(name, DEFAULT_SHAPES)
    assert isinstance(m, zoo.ZooModel)
    assert m.name == name and m.description == zoo.describe(name) and m.task == task
    assert isinstance(m.example_inputs, tuple)
    assert all(isinstance(t, torch.Tensor) for t in m.example_inputs)
    assert m.example_inputs[0].shape == in_shape
    assert not m.model.training
    assert not any(mod.training for mod in m.model.modules())
    y = _run(m.model, m.example_inputs)
    assert y.shape == out_shape
    assert torch.isfinite(y).all()
    assert y.abs().max() > 1e-3, "output is (nearly) all zeros"
    assert y.abs().max() < 1e4, "output explodes"


@pytest.mark.parametrize("name", RANDOM)
def test_build_is_deterministic(name: str) -> None:
    a = zoo.get(name, seed=3)
    b = zoo.get(name, seed=3)
    assert a.model is not b.model
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = zoo.get(name, seed=4)
    assert not torch.equal(a.example_inputs[0], c.example_inputs[0])
    assert any(not torch.equal(sa[k], v) for k, v in c.model.state_dict().items())


@pytest.mark.parametrize("name", zoo.names())
def test_fx_trace_matches_eager(name: str) -> None:
    m = zoo.get(name)
    gm = torch.fx.symbolic_trace(m.model)
    torch.testing.assert_close(
        _run(gm, m.example_inputs), _run(m.model, m.example_inputs), rtol=0, atol=0
    )


def _onnx_roundtrip(name: str) -> None:
    import onnxruntime as ort

    m = zoo.get(name)
    f = io.BytesIO()
    torch.onnx.export(
        m.model,
        m.example_inputs,
        f,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.cat([m.example_inputs[0], torch.flip(m.example_inputs[0], [-1])])  # batch of 2
    expected = _run(m.model, (x,)).numpy()
    (got,) = sess.run(None, {"x": x.numpy()})
    assert got.shape == expected.shape
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err < 1e-4, f"{name}: ONNX Runtime differs from torch by {err:.2e} (relative)"


@pytest.mark.parametrize("name", sorted(ONNX_FAST))
def test_onnx_export_matches_torch(name: str) -> None:
    _onnx_roundtrip(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ALL) - ONNX_FAST))
def test_onnx_export_matches_torch_big(name: str) -> None:
    _onnx_roundtrip(name)


def test_unknown_name_suggests() -> None:
    with pytest.raises(GraphoptError, match="resnet18") as info:
        zoo.get("resnet19")
    msg = str(info.value)
    assert "unknown zoo model 'resnet19'" in msg
    assert "Did you mean" in msg
    assert "vit_s" in msg  # the list of available models


@pytest.mark.parametrize("name", zoo.names())
def test_get_leaves_global_rng_alone(name: str) -> None:
    state = torch.get_rng_state()
    zoo.get(name, seed=7)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", [n for n in RANDOM if n in WITH_BN])
def test_bn_layers_are_not_identity(name: str) -> None:
    bns = [m for m in zoo.get(name).model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


def test_randomize_bn_stats_ranges_and_generator() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm1d(4096))

    a = make()
    assert zoo.randomize_bn_stats_(a, torch.Generator().manual_seed(1)) is a
    bn = a[2]
    assert ((bn.running_var >= 0.5) & (bn.running_var <= 2.0)).all()
    assert ((bn.weight >= 0.5) & (bn.weight <= 1.5)).all()
    assert abs(bn.running_mean.std().item() - 0.5) < 0.05
    assert abs(bn.bias.std().item() - 0.2) < 0.02
    b = zoo.randomize_bn_stats_(make(), torch.Generator().manual_seed(1))
    for k in ("running_mean", "running_var", "weight", "bias"):  # same generator, same stats
        assert torch.equal(getattr(a[1], k), getattr(b[1], k))
        assert torch.equal(getattr(a[2], k), getattr(b[2], k))


def test_digits_data() -> None:
    xtr, ytr = zoo.digits_data("train")
    xte, yte = zoo.digits_data("test")
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert len(xtr) + len(xte) == 1797 and len(xte) == 1797 // 5
    assert xtr.min() >= 0 and xtr.max() <= 1
    assert set(yte.tolist()) == set(range(10))
    x2, _ = zoo.digits_data("test")
    assert torch.equal(xte, x2)
    with pytest.raises(GraphoptError):
        zoo.digits_data("validation")


def test_digits_cnn_is_trained_and_cached() -> None:
    m = zoo.get("digits_cnn")
    x, y = zoo.digits_data("test")
    assert torch.equal(m.example_inputs[0], x[:1])
    acc = (_run(m.model, (x,)).argmax(1) == y).float().mean().item()
    assert acc >= 0.95
    m2 = zoo.get("digits_cnn")  # served from the in-process cache: same trained weights
    assert m2.model is not m.model
    for (k, v), v2 in zip(
        m.model.state_dict().items(), m2.model.state_dict().values(), strict=True
    ):
        assert torch.equal(v, v2), k
    # its BN statistics come from training, not from randomize_bn_stats_
    bn = m.model.features[1]
    assert not ((bn.running_var >= 0.5) & (bn.running_var <= 2.0)).all()


def test_repvgg_a0_has_three_branch_blocks() -> None:
    model = zoo.get("repvgg_a0").model
    blocks = [m for m in model.modules() if isinstance(m, zoo.RepVGGBlock)]
    assert len(blocks) == 1 + 2 + 4 + 14 + 1
    n_bn = [sum(isinstance(m, nn.BatchNorm2d) for m in b.modules()) for b in blocks]
    # the first block of each stage is strided (no identity branch), the others have one
    assert n_bn == [2] + [2, 3] + [2, 3, 3, 3] + [2] + [3] * 13 + [2]
    assert blocks[1].rbr_1x1.conv.kernel_size == (1, 1)
    assert model.linear.in_features == 1280


def test_mobileone_s0_blocks_have_four_conv_branches() -> None:
    model = zoo.get("mobileone_s0").model
    for stage in (model.stage1, model.stage2, model.stage3, model.stage4):
        for i, block in enumerate(stage):
            assert isinstance(block, zoo.MobileOneBlock)
            assert len(block.rbr_conv) == 4
            depthwise = i % 2 == 0
            conv = block.rbr_conv[0].conv
            assert conv.kernel_size == ((3, 3) if depthwise else (1, 1))
            assert (conv.groups == conv.in_channels) == depthwise
            assert (block.rbr_scale is not None) == depthwise
    assert [len(s) for s in (model.stage1, model.stage2, model.stage3, model.stage4)] == [
        4,
        16,
        20,
        2,
    ]
    assert model.linear.in_features == 1024


def test_mobileone_block_options() -> None:
    norm = zoo.MobileOneBlock(
        8, 8, 3, groups=8, num_conv_branches=0, activation=None, use_scale_branch=False
    )
    assert len(norm.rbr_conv) == 0 and norm.rbr_scale is None and norm.activation is None
    zoo.randomize_bn_stats_(norm).eval()
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(_run(norm, (x,)), _run(norm.rbr_skip, (x,)), rtol=0, atol=0)
    gelu = zoo.MobileOneBlock(8, 16, 3, 2, activation=nn.GELU)
    assert isinstance(gelu.activation, nn.GELU) and gelu.rbr_skip is None
    with pytest.raises(GraphoptError, match="no branch"):
        zoo.MobileOneBlock(8, 16, 3, num_conv_branches=0, use_scale_branch=False)


# ---------------------------------------------------------------------------------------------
# the re-parameterisable blocks: each is exactly one convolution


def _as_one_conv(
    block: nn.Module, cin: int, k: int, stride: int = 1, size: int = 12
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kxk conv (stride, padding k//2, dense weight, bias) that ``block`` computes, probed
    in float64: the bias from a zero input, which must be spatially constant (at the borders
    too), the kernel from one-hot inputs. Then checked on random inputs of two sizes."""
    block = block.double().eval()
    p = k // 2
    with torch.no_grad():
        b_map = block(torch.zeros(1, cin, size, size, dtype=torch.float64))
        b = b_map[0, :, 0, 0]
        assert torch.allclose(b_map, b.view(1, -1, 1, 1).expand_as(b_map), rtol=0, atol=1e-9), (
            "the response to a zero input is not spatially constant: the padding differs "
            "from a single conv's"
        )
        o = size // (2 * stride)  # an output pixel whose kxk input window is inside the image
        probes = torch.zeros(cin * k * k, cin, size, size, dtype=torch.float64)
        for n, (c, u, v) in enumerate(np.ndindex(cin, k, k)):
            probes[n, c, o * stride - p + u, o * stride - p + v] = 1.0
        kernel = (block(probes)[:, :, o, o] - b).T.reshape(-1, cin, k, k)
        for hw in (size, size + 1):
            x = torch.randn(2, cin, hw, hw, dtype=torch.float64)
            want = F.conv2d(x, kernel, b, stride, p)
            torch.testing.assert_close(block(x), want, rtol=1e-9, atol=1e-9)
    return kernel, b


def _in_group(cout: int, cin: int, groups: int) -> torch.Tensor:
    """[cout, cin] mask: True where output channel o reads input channel i."""
    return torch.block_diag(*[torch.ones(cout // groups, cin // groups)] * groups).bool()


def _bn_ready(block: nn.Module) -> nn.Module:
    return zoo.randomize_bn_stats_(block, torch.Generator().manual_seed(0)).eval()


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "groups"),
    [
        (8, 8, 3, 1, 1),  # identity-based 1x1, all four branches
        (8, 16, 3, 2, 1),  # strided, as the first block of a ResNet stage
        (3, 16, 7, 2, 1),  # the 7x7 stem
        (8, 8, 3, 1, 8),  # depthwise: no 1x1 branch, avg-pool straight on x, 2x internal width
        (8, 8, 3, 2, 8),
        (8, 8, 5, 1, 2),  # grouped
    ],
)
def test_diverse_branch_block_is_one_conv(cin, cout, k, stride, groups) -> None:
    torch.manual_seed(0)
    block = _bn_ready(zoo.DiverseBranchBlock(cin, cout, k, stride, groups))
    depthwise = groups == cout
    assert (block.dbb_1x1 is None) == depthwise
    assert hasattr(block.dbb_1x1_kxk, "conv1") == depthwise  # else an IdentityBasedConv1x1
    kernel, _ = _as_one_conv(block, cin, k, stride)
    # the merged kernel is grouped: zero between a group's outputs and other groups' inputs
    assert (kernel.abs().amax((2, 3)) * ~_in_group(cout, cin, groups)).max() < 1e-12


def test_dbb_needs_the_bn_bias_padding() -> None:
    """With plain zero padding after the BN, a DBB is no longer one convolution."""
    torch.manual_seed(0)
    block = _bn_ready(zoo.DiverseBranchBlock(8, 8, 3))
    block.dbb_1x1_kxk.bn1.forward = lambda x: F.pad(block.dbb_1x1_kxk.bn1.bn(x), [1] * 4)
    with pytest.raises(AssertionError, match="not spatially constant"):
        _as_one_conv(block, 8, 3)


def test_bn_and_pad_matches_upstream() -> None:
    layer = _bn_ready(zoo.BNAndPad(6, 2))
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():  # upstream's BNAndPadLayer: pad with 0, then overwrite the borders
        bn = layer.bn
        v = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(
            1, -1, 1, 1
        )
        want = F.pad(bn(x), [2] * 4)
        want[:, :, :2, :] = v
        want[:, :, -2:, :] = v
        want[:, :, :, :2] = v
        want[:, :, :, -2:] = v
        got = layer(x)
    assert got.shape == (2, 6, 9, 11)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[:, :, 0, 0], v[:, :, 0, 0].expand(2, 6), rtol=0, atol=1e-6)


def test_identity_based_conv1x1() -> None:
    conv = zoo.IdentityBasedConv1x1(6, groups=2)
    assert conv.id_tensor.shape == (6, 3, 1, 1) and conv.id_tensor.sum() == 6
    assert "id_tensor" in dict(conv.named_buffers()) and conv.weight.abs().sum() > 0
    x = torch.randn(1, 6, 4, 4)
    want = F.conv2d(x, conv.weight + conv.id_tensor, groups=2)
    torch.testing.assert_close(_run(conv, (x,)), want, rtol=0, atol=0)
    with torch.no_grad():
        conv.weight.zero_()
    torch.testing.assert_close(_run(conv, (x,)), x, rtol=0, atol=0)


@pytest.mark.parametrize(("stride", "groups"), [(1, 1), (2, 1), (1, 4)])
def test_acblock_is_one_conv_with_cross_shaped_extra_taps(stride, groups) -> None:
    torch.manual_seed(0)
    block = _bn_ready(zoo.ACBlock(8, 8, 3, stride, groups))
    assert block.hor_conv.kernel_size == (1, 3) and block.hor_conv.padding == (0, 1)
    assert block.ver_conv.kernel_size == (3, 1) and block.ver_conv.padding == (1, 0)
    kernel, _ = _as_one_conv(block, 8, 3, stride)
    square, _ = _as_one_conv(nn.Sequential(block.square_conv, block.square_bn), 8, 3, stride)
    corners = (slice(None), slice(None), [0, 0, 2, 2], [0, 2, 0, 2])
    torch.testing.assert_close(kernel[corners], square[corners], rtol=0, atol=1e-12)
    cross = (slice(None), slice(None), [0, 1, 1, 1, 2], [1, 0, 1, 2, 1])
    extra = (kernel[cross] - square[cross]).abs()[_in_group(8, 8, groups)]
    assert extra.amin() > 0  # every tap of the cross gets a term from the 1x3 or 3x1


def test_fastvit_blocks_are_one_conv() -> None:
    torch.manual_seed(0)
    mixer = _bn_ready(zoo.RepMixer(8))
    with torch.no_grad():
        mixer.layer_scale.uniform_(0.5, 1.5)
    kernel, _ = _as_one_conv(mixer, 8, 3)
    off_diagonal = kernel.abs().amax((2, 3)) * (1 - torch.eye(8, dtype=kernel.dtype))
    assert off_diagonal.max() < 1e-12  # depthwise
    lk = _bn_ready(zoo.ReparamLargeKernelConv(4, 8, 7, 2, groups=4, small_kernel=3))
    assert isinstance(lk.activation, nn.GELU)
    lk.activation = nn.Identity()  # the sum before the activation
    _as_one_conv(lk, 4, 7, 2, size=16)


def test_sesr_linear_block_is_one_conv() -> None:
    torch.manual_seed(0)
    block = zoo.LinearBlock(4, 4, 3, feature_size=32)
    with torch.no_grad():
        for conv in (block.conv_expand, block.conv_squeeze):
            conv.bias.normal_()
    _as_one_conv(block, 4, 3)


# ---------------------------------------------------------------------------------------------
# the train-time zoo networks: how many blocks, how many branches


def test_dbb_resnet18_blocks() -> None:
    model = zoo.get("dbb_resnet18").model
    dbbs = [m for m in model.modules() if isinstance(m, zoo.DiverseBranchBlock)]
    assert len(dbbs) == 1 + 2 * 8 and dbbs[0] is model.stem
    assert model.stem.dbb_origin.conv.kernel_size == (7, 7)
    assert model.stem.dbb_origin.conv.stride == (2, 2)
    assert model.stem.dbb_1x1_kxk.idconv1.weight.shape == (3, 3, 1, 1)
    for dbb in dbbs:
        assert len(dbb.branch_convs()) == 4
        assert isinstance(dbb.dbb_1x1_kxk.idconv1, zoo.IdentityBasedConv1x1)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in dbb.modules()) == 6
        assert sum(isinstance(m, zoo.BNAndPad) for m in dbb.modules()) == 2
    blocks = [m for m in model.modules() if isinstance(m, zoo.DBBBasicBlock)]
    assert [b.conv1.dbb_origin.conv.stride for b in blocks] == [
        (1, 1),
        (1, 1),
        (2, 2),
        (1, 1),
        (2, 2),
        (1, 1),
        (2, 2),
        (1, 1),
    ]
    downsamples = [m.downsample for m in model.modules() if getattr(m, "downsample", None)]
    assert [type(d[0]) for d in downsamples] == [nn.Conv2d] * 3  # plain 1x1 conv-BN
    assert not hasattr(model, "conv1") and model.fc.in_features == 512


def test_acnet_resnet18_blocks() -> None:
    model = zoo.get("acnet_resnet18").model
    acbs = [m for m in model.modules() if isinstance(m, zoo.ACBlock)]
    assert len(acbs) == 2 * 8
    for acb in acbs:
        kernels = [c.kernel_size for c in acb.branch_convs()]
        assert kernels == [(3, 3), (3, 1), (1, 3)]
        assert len({c.stride for c in acb.branch_convs()}) == 1
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (7, 7)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 1 + 16 * 3 + 3  # stem, three per ACBlock, downsamples


def test_fastvit_t_layout() -> None:
    model = zoo.get("fastvit_t").model
    assert [type(m) for m in model.patch_embed] == [zoo.MobileOneBlock] * 3
    assert all(isinstance(m.activation, nn.GELU) for m in model.patch_embed)
    stages = [m for m in model.network if isinstance(m, nn.Sequential)]
    assert [len(s) for s in stages] == [2, 2, 4, 2]
    assert [s[0].token_mixer.layer_scale.shape[0] for s in stages] == [48, 96, 192, 384]
    embeds = [m for m in model.network if isinstance(m, zoo.PatchEmbed)]
    assert len(embeds) == 3
    for e in embeds:
        lk = e.proj[0]
        assert lk.lkb_origin.conv.kernel_size == (7, 7) and lk.small_conv.conv.kernel_size == (3, 3)
        assert lk.lkb_origin.conv.groups == lk.lkb_origin.conv.in_channels
    mixers = [m for m in model.modules() if isinstance(m, zoo.RepMixer)]
    assert len(mixers) == 10
    for m in mixers:
        assert len(m.norm.rbr_conv) == 0 and m.norm.rbr_scale is None and m.norm.activation is None
        assert len(m.mixer.rbr_conv) == 1 and m.mixer.rbr_scale is not None
        assert m.mixer.rbr_skip is not None and m.mixer.activation is None
    scales = torch.cat(
        [m.layer_scale.flatten() for m in model.modules() if hasattr(m, "layer_scale")]
    )
    assert scales.numel() == 2 * (2 * 48 + 2 * 96 + 4 * 192 + 2 * 384)
    assert scales.min() >= 0.5 and scales.max() <= 1.5 and scales.std() > 0.1  # not 1e-5
    assert not any(isinstance(m, zoo.Attention) for m in model.modules())
    assert model.head.in_features == 384


def test_sesr_m5_layout() -> None:
    model = zoo.get("sesr_m5").model
    blocks = [m for m in model.modules() if isinstance(m, zoo.LinearBlock)]
    assert [b.conv_expand.kernel_size[0] for b in blocks] == [5, 3, 3, 3, 3, 3, 5]
    assert all(b.conv_expand.out_channels == 256 for b in blocks)
    assert [b.conv_squeeze.out_channels for b in blocks] == [16] * 6 + [4]
    assert sum(isinstance(m, nn.PReLU) for m in model.modules()) == 5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(b.conv_expand.bias.abs().min() > 0 for b in blocks)  # random biases
    # without the output block, what is left is the input, repeated over the 4 channels that
    # depth-to-space spreads over each 2x2 output patch: nearest-neighbour upsampling
    x = zoo.get("sesr_m5").example_inputs[0]
    with torch.no_grad():
        model.output_block.conv_squeeze.weight.zero_()
        model.output_block.conv_squeeze.bias.zero_()
    want = F.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(_run(model, (x,)), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# the default pass pipeline on the zoo models, in the modes users call it from (issue 15)

# two small models (with crops of the inputs) keep the extra modes cheap; optimize() runs every
# zoo model in grad mode in tests/test_api.py
PIPELINE_MODELS = ["repvgg_a0", "sesr_m5"]
_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.parametrize("name", PIPELINE_MODELS)
def test_default_pipeline_under(name: str, mode: str) -> None:
    """Under torch.inference_mode() reparameterize failed on every model and was rolled back
    (RepVGG and SESR stayed un-merged). Every pass of the default pipeline applies under
    inference_mode and no_grad, the re-parameterizable blocks merge, the numbers are kept and
    the user's model is left alone."""
    from graphopt.core.pass_infra import PassContext
    from graphopt.frontends.torch import capture
    from graphopt.pipeline import PassManager
    from graphopt.target import DEFAULT_PIPELINES

    entry = zoo.get(name)
    x = entry.example_inputs[0][..., :32, :32].contiguous()
    before = {k: v.clone() for k, v in entry.model.state_dict().items()}
    want = _run(entry.model, (x,))
    with _MODES[mode]():
        gm = capture(entry.model, (x,)).graph
        result = PassManager(DEFAULT_PIPELINES["cpu"], strict=True).run(
            gm, PassContext(sample_inputs=(x,))
        )
        got = result.graph(x)
    assert all(r.status == "ok" for r in result.records), [
        (r.name, r.status, r.message) for r in result.records
    ]
    assert result.end_to_end is not None and result.end_to_end.ok
    merges = next(r.stats for r in result.records if r.name == "reparameterize")
    assert merges.get("collapsed", 0) + merges.get("collapsed-sequential", 0) > 0
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert all(torch.equal(before[k], v) for k, v in entry.model.state_dict().items())


def test_float64_model_is_folded_and_merged_at_float64_precision() -> None:
    """A float64 model is folded and merged in float64 (reparameterize rounded its merged
    kernels to float32 and was rolled back for missing float64's exact contract)."""
    from graphopt.core.pass_infra import PassContext
    from graphopt.frontends.torch import capture
    from graphopt.passes import FoldConvBN, Reparameterize

    entry = zoo.get("repvgg_a0")
    model = entry.model.double()
    x = entry.example_inputs[0][..., :16, :16].double()
    gm = capture(model, (x,)).graph
    ctx = PassContext(sample_inputs=(x,))
    gm = FoldConvBN().run(gm, ctx).graph
    result = Reparameterize().run(gm, ctx)
    assert result.stats["collapsed"] == 22 and result.stats["convs"] == 22
    assert all(p.dtype == torch.float64 for p in result.graph.parameters())
    want, got = _run(model, (x,)), _run(result.graph, (x,))
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()

"""Tests of graphopt.zoo: the built-in models and the digits data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from graphopt import zoo
from graphopt.errors import GraphoptError

ALL = ["digits_cnn", "mobilenetv2", "mobileone_s0", "repvgg_a0", "resnet18", "resnet50", "vit_s"]
RANDOM = [n for n in ALL if n != "digits_cnn"]
WITH_BN = [n for n in ALL if n != "vit_s"]
# ONNX round trips of the big nets take a few seconds each; the small ones run by default.
ONNX_FAST = {"digits_cnn", "resnet18", "vit_s", "mobilenetv2"}


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_names() -> None:
    assert zoo.names() == ALL


@pytest.mark.parametrize("name", zoo.names())
def test_get_returns_eval_model_with_sane_outputs(name: str) -> None:
    m = zoo.get(name)
    assert isinstance(m, zoo.ZooModel)
    assert m.name == name and m.description and m.task == "classification"
    assert isinstance(m.example_inputs, tuple)
    assert all(isinstance(t, torch.Tensor) for t in m.example_inputs)
    assert not m.model.training
    assert not any(mod.training for mod in m.model.modules())
    y = _run(m.model, m.example_inputs)
    assert y.shape == (1, 10 if name == "digits_cnn" else 1000)
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

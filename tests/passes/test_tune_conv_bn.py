"""tune-conv-bn and graphopt.tune_mode: structure, outputs *and gradients* equal to Eval mode's,
checkpoints, parameter identity, optimizer steps, refusals, torch.compile, random CNNs.

Eval mode is the reference: the original model with every BatchNorm in eval mode (the rest in
train mode where dropout matters, with the same random seed). Every BatchNorm has random running
statistics and affine parameters (``randomize_bn``, or the zoo's own randomisation): an identity
BN would hide a wrong scale or shift. Tolerances come from ``TuneConvBN.numerics`` (float32:
1e-5 of each output's or gradient's magnitude).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import fx, nn

import graphopt
from graphopt import zoo
from graphopt.core.numerics import compare, flatten_outputs, run_module
from graphopt.core.printing import canonical_ir, fingerprint
from graphopt.errors import CaptureError, GraphoptError
from graphopt.passes import tune_conv_bn as tune
from graphopt.passes.tune_conv_bn import TuneConvBN, tune_conv_bn
from graphopt.testing import (
    assert_pass_preserves,
    random_bn,
    random_cnns,
    random_input,
    randomize_bn,
    seeded,
    verify_rewrite,
)

NUMERICS = TuneConvBN.numerics
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_SIZE = {1: 11, 2: 7, 3: 5}


_gen, _bn, _x = seeded, random_bn, random_input


def _eval_mode(model: nn.Module, train: bool = False) -> nn.Module:
    """A copy of ``model`` in Eval mode: BatchNorms frozen, the rest in train mode if ``train``."""
    ref = copy.deepcopy(model).train(train)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return ref


def _step(module: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 0):
    """Forward and backward of a fixed random projection of the outputs (same dropout seed).

    Returns the outputs and ``{name: gradient}`` of every parameter (``None`` where it gets
    none) and of every input (``input[i]``: what flows back to the layers before).
    """
    for p in module.parameters():
        p.grad = None
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    torch.manual_seed(seed)
    outputs = flatten_outputs(module(*inputs))
    gen = _gen(seed + 100)
    loss = sum(
        (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() for out in outputs
    )
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    grads.update({f"input[{i}]": x.grad for i, x in enumerate(inputs)})
    return [o.detach() for o in outputs], grads


def _assert_trains_like(reference: nn.Module, tuned: nn.Module, inputs, seed: int = 0) -> None:
    """Outputs and the gradient of every parameter equal under ``NUMERICS``."""
    ref_out, ref_grads = _step(reference, inputs, seed)
    out, grads = _step(tuned, inputs, seed)
    cmp = compare(ref_out, out, NUMERICS)
    assert cmp.ok, f"outputs: {cmp.describe()}"
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        assert (grad is None) == (ref_grad is None), name
        if ref_grad is not None:
            cmp = compare([ref_grad], [grad], NUMERICS)
            assert cmp.ok, f"gradient of {name}: {cmp.describe()}"


def _bn_modules_called(gm: fx.GraphModule) -> list[str]:
    return [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    ]


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ------------------------------------------------------------------------------------------------
# 1. structure: Before -> Expected


class _TunedConvBNReLU(nn.Module):
    """What Conv2d -> BatchNorm2d -> ReLU becomes: the modules stay, one call uses both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(tune.tune_conv_bn(x, self.conv, self.bn))  # FX-wrapped there


class _ConvBNReLU(_TunedConvBNReLU):
    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def test_rewrites_conv_bn_into_one_tune_call_on_the_same_modules():
    before = _ConvBNReLU()
    randomize_bn(before.bn, _gen())
    result = verify_rewrite("tune-conv-bn", before, _TunedConvBNReLU(), (_x((2, 3, 6, 6)),))
    assert dict(result.stats) == {"tuned": 1}
    assert result.graph.get_submodule("bn") is not None  # kept, under its own path


def test_freeze_bn_rewrites_a_lone_batch_norm_and_is_off_by_default():
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return tune.frozen_batch_norm(x, self.bn).relu()

    class Lone(Frozen):
        def forward(self, x):
            return self.bn(x).relu()

    before, x = Lone(), _x((2, 4, 5, 5))
    randomize_bn(before.bn, _gen())
    result = verify_rewrite("tune-conv-bn", before, Frozen(), (x,), freeze_bn=True)
    assert dict(result.stats) == {"frozen": 1}
    unchanged = assert_pass_preserves(TuneConvBN(), before, (x,), expect_modified=False)
    assert dict(unchanged.stats) == {}


def test_tracing_a_tuned_graph_again_keeps_the_tune_call_whole():
    tuned = graphopt.tune_mode(_small_model())
    again = fx.symbolic_trace(tuned)
    assert _targets(again).count(tune_conv_bn) == 2
    assert _targets(again).count(tune.frozen_batch_norm) == 1
    x = _x((2, 3, 6, 6))
    assert torch.equal(again(x), tuned(x))


# ------------------------------------------------------------------------------------------------
# 2. outputs and gradients equal Eval mode's, over the grid


def _assert_tunes(model: nn.Module, x: torch.Tensor, stats: dict, **options) -> fx.GraphModule:
    x2 = torch.cat([x, x.flip(0) * 0.5])  # another batch size: nothing is baked in
    result = assert_pass_preserves(
        TuneConvBN(**options), model.eval(), (x,), more_inputs=[(x2,)], expect_modified=True
    )
    assert dict(result.stats) == stats
    assert not _bn_modules_called(result.graph), canonical_ir(result.graph)
    _assert_trains_like(_eval_mode(model), result.graph, (x,))
    return result.graph


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("groups", ["1", "2", "depthwise"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_bn_trains_like_eval_mode(dims, groups, bias):
    cin = 4
    g = {"1": 1, "2": 2, "depthwise": cin}[groups]
    cout = 6 if g != cin else 2 * cin  # depthwise with a channel multiplier of 2
    model = nn.Sequential(
        _CONV[dims](cin, cout, 3, stride=2, padding=1, dilation=1, groups=g, bias=bias),
        _bn(_BN[dims], cout),
        nn.ReLU(),
        _CONV[dims](cout, 3, 3, padding=2, dilation=2, bias=not bias),
        _bn(_BN[dims], 3, seed=1),
    )
    _assert_tunes(model, _x((2, cin, *[_SIZE[dims]] * dims)), {"tuned": 2})


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_with_a_padding_mode_and_bn_without_affine_trains_like_eval_mode(mode):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode=mode),
        _bn(nn.BatchNorm2d, 6, affine=False),
    )
    graph = _assert_tunes(model, _x((2, 3, 7, 7)), {"tuned": 1})
    assert set(dict(graph.named_parameters())) == {"0.weight", "0.bias"}


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on the reference conv
@pytest.mark.parametrize(
    "padding,kernel,dilation",
    [("same", 3, 1), ("same", 4, 1), ("same", (2, 3), (3, 1)), ("valid", 3, 2)],
    ids=["same-3", "same-4-odd-total", "same-2x3-d3", "valid-d2"],
)
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_string_padding_trains_like_eval_mode(padding, kernel, dilation, mode):
    """'same' with an odd total padding pads one more zero on the right (as aten does)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation, padding_mode=mode),
        _bn(nn.BatchNorm2d, 4),
    )
    _assert_tunes(model, _x((2, 3, 8, 9)), {"tuned": 1})


@pytest.mark.parametrize("frozen", ["conv.weight", "bn.weight", "bn", "all"])
def test_frozen_parameters_get_no_gradient_and_the_rest_eval_modes(frozen):
    """A frozen backbone: gradients only where Eval mode has them (and of the input)."""
    model = _ConvBNReLU()
    randomize_bn(model.bn, _gen())
    names = {"all": ["conv.weight", "bn.weight", "bn.bias"], "bn": ["bn.weight", "bn.bias"]}
    for name in names.get(frozen, [frozen]):
        model.get_parameter(name).requires_grad_(False)
    graph = _assert_tunes(model, _x((2, 3, 6, 6)), {"tuned": 1})
    _, grads = _step(graph, (_x((2, 3, 6, 6)),))
    assert {n for n, g in grads.items() if g is None} == set(names.get(frozen, [frozen]))


def test_double_backward_is_refused_not_silently_wrong():
    tuned = graphopt.tune_mode(_small_model())
    x = _x((2, 3, 6, 6)).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(tuned(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()


def test_autocast_runs_with_plain_autograd_close_to_eval_mode():
    model = _small_model()
    reference, tuned = _eval_mode(model), graphopt.tune_mode(model)
    x = _x((2, 3, 6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = _step(reference, (x,))
        out, grads = _step(tuned, (x,))
    assert out[0].dtype == ref_out[0].dtype
    bf16 = graphopt.Numerics.lossy("rel_max", 0.05)  # bfloat16 keeps 8 bits of mantissa
    cmp = compare(ref_out, out, bf16)
    assert cmp.ok, cmp.describe()
    cmp = compare([ref_grads["0.weight"]], [grads["0.weight"]], bf16)
    assert cmp.ok, cmp.describe()


_CONVT_CASES = {
    # name: (cin, cout, groups, kernel, stride, padding, output_padding, dilation)
    "g1-s2-op1": (4, 6, 1, 3, 2, 1, 1, 1),
    "g2-s2-op1": (4, 6, 2, 3, 2, 1, 1, 1),
    "g3-s3-op2": (6, 9, 3, 2, 3, 0, 2, 1),
    "depthwise-d2": (4, 8, 4, 3, 1, 1, 0, 2),
}


@pytest.mark.parametrize("case", list(_CONVT_CASES))
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_transpose_bn_trains_like_eval_mode_per_group(dims, case):
    """ConvTranspose weights are [C_in, C_out/g, k..]: the scale goes on dim 1, per group."""
    cin, cout, g, k, s, p, op, d = _CONVT_CASES[case]
    conv = _CONVT[dims](cin, cout, k, s, p, op, groups=g, dilation=d)
    model = nn.Sequential(conv, _bn(_BN[dims], cout))
    _assert_tunes(model, _x((2, cin, *[_SIZE[dims]] * dims)), {"tuned": 1})


def test_conv_module_called_twice_is_tuned_and_both_calls_train_its_weight():
    """fold-conv-bn must refuse this (shared weight); Tune mode rewrites no weight, so the other
    call still reads W and the gradients of both uses add up as in Eval mode."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), _bn(nn.BatchNorm2d, 4)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    graph = _assert_tunes(M(), _x((2, 4, 6, 6)), {"tuned": 1})
    assert [n.target for n in graph.graph.nodes if n.op == "call_module"] == ["conv"]


def test_batch_norm_shared_by_two_convs_is_tuned_twice():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.bn = _bn(nn.BatchNorm2d, 4)

        def forward(self, x):
            return self.bn(self.b(self.bn(self.a(x))))

    _assert_tunes(M(), _x((2, 4, 6, 6)), {"tuned": 2})


# ------------------------------------------------------------------------------------------------
# 2. the zoo, through the public API


def _assert_random_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert not torch.allclose(m.weight, torch.ones_like(m.weight))


@pytest.mark.parametrize(
    "name,stats",
    [
        ("resnet18", {"tuned": 20}),
        ("mobilenetv2", {"tuned": 52}),
        ("repvgg_a0", {"tuned": 44, "frozen": 17}),  # the identity branches are lone BNs
        ("mobileone_s0", {"tuned": 191, "frozen": 35}),
    ],
)
def test_zoo_model_fine_tunes_like_eval_mode(name, stats):
    model = zoo.get(name).model
    _assert_random_bn(model)
    x = _x((2, 3, 32, 32))
    tuned = graphopt.tune_mode(model, (x,))
    assert tuned.meta["graphopt.tune_conv_bn"] == stats
    assert not _bn_modules_called(tuned)
    # fine-tuning: .train() switches dropout (mobilenetv2) on, BatchNorm stays frozen
    tuned.train()
    _assert_trains_like(_eval_mode(model, train=True), tuned, (x,))


# ------------------------------------------------------------------------------------------------
# checkpoints, parameters, optimizer steps


def _small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5),
    )
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m, _gen(seed + i))
    return model.eval()


def test_tuned_module_has_the_original_parameters_and_state_dict_keys():
    model = _small_model()
    model[3].bias.requires_grad_(False)  # a frozen parameter stays frozen
    tuned = graphopt.tune_mode(model)
    assert list(dict(tuned.named_parameters())) == list(dict(model.named_parameters()))
    assert list(tuned.state_dict()) == list(model.state_dict())
    assert not tuned.get_parameter("3.bias").requires_grad
    # the graph reads the parameters the optimizer sees, not a folded copy made once
    params = dict(tuned.named_parameters())
    x = _x((2, 3, 6, 6))
    before = tuned(x)
    with torch.no_grad():
        params["1.weight"].mul_(2.0)
    assert not torch.allclose(tuned(x), before)
    _, grads = _step(tuned, (x,))
    assert grads["3.bias"] is None and grads["1.weight"] is not None


def test_state_dict_after_training_loads_into_the_original_model():
    model = _small_model()
    tuned = graphopt.tune_mode(model)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1, momentum=0.9)
    tuned.train()
    for seed in range(2):
        opt.zero_grad()
        _step(tuned, (_x((4, 3, 6, 6), seed),), seed)
        opt.step()
    original = _small_model(seed=1)  # other weights, same architecture
    original.load_state_dict(tuned.state_dict(), strict=True)
    x = _x((2, 3, 6, 6), 5)
    tuned.eval()
    cmp = compare([original(x)], [tuned(x)], NUMERICS)
    assert cmp.ok, cmp.describe()
    # the trained tensors differ from the starting ones: the roundtrip carried real updates
    assert not torch.equal(original[0].weight, model[0].weight)


def test_state_dict_keys_match_with_unused_modules_and_non_persistent_buffers():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), _bn(nn.BatchNorm2d, 4)
            self.unused_head = nn.Linear(4, 2)  # not called in forward
            self.register_buffer("offset", torch.full((1, 4, 1, 1), 0.5), persistent=False)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.offset + torch.ones(1)  # ones: a traced constant

    model = M().eval()
    tuned = graphopt.tune_mode(model, (_x((2, 3, 4, 4)),))
    assert set(tuned.state_dict()) == set(model.state_dict())
    assert "unused_head.weight" in dict(tuned.named_parameters())
    M().load_state_dict(tuned.state_dict(), strict=True)


def test_optimizer_steps_match_eval_mode():
    model = _small_model()
    reference = _eval_mode(model, train=True)
    tuned = graphopt.tune_mode(model).train()
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        for m in (reference, tuned)
    ]
    for seed in range(3):
        for m, opt in zip((reference, tuned), optimizers, strict=True):
            opt.zero_grad()
            _step(m, (_x((4, 3, 6, 6), seed),), seed)
            opt.step()
    ref_params, params = dict(reference.named_parameters()), dict(tuned.named_parameters())
    for name, p in ref_params.items():
        assert not torch.equal(p, dict(model.named_parameters())[name]), f"{name} did not move"
        cmp = compare([p.detach()], [params[name].detach()], NUMERICS)
        assert cmp.ok, f"{name}: {cmp.describe()}"


def test_train_mode_keeps_every_batch_norm_frozen_and_its_statistics_unchanged():
    model = _small_model()
    tuned = graphopt.tune_mode(model).train()
    assert all(m.training for m in tuned.modules())
    buffers = {k: v.clone() for k, v in tuned.named_buffers()}
    _assert_trains_like(_eval_mode(model, train=True), tuned, (_x((4, 3, 6, 6)),))
    for key, value in tuned.named_buffers():
        assert torch.equal(value, buffers[key]), f"{key} was updated"


def test_tune_mode_never_changes_the_users_model():
    model = _small_model()
    printed = fingerprint(model)
    tuned = graphopt.tune_mode(model).train()
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1)
    _step(tuned, (_x((4, 3, 6, 6)),))
    opt.step()
    assert fingerprint(model) == printed
    assert not model.training


def test_torch_compile_of_the_tuned_module_matches_eager_forward_and_backward():
    model = _small_model()
    tuned = graphopt.tune_mode(model)  # eval: dropout off, so eager and compiled agree
    x = _x((2, 3, 6, 6))
    eager_out, eager_grads = _step(tuned, (x,))
    compiled = torch.compile(tuned)
    out, grads = _step(compiled, (x,))
    cmp = compare(eager_out, out, NUMERICS)
    assert cmp.ok, cmp.describe()
    for name, grad in eager_grads.items():
        prefix = "" if name.startswith("input") else "_orig_mod."
        cmp = compare([grad], [grads[prefix + name]], NUMERICS)
        assert cmp.ok, f"{name}: {cmp.describe()}"


# ------------------------------------------------------------------------------------------------
# 3. must not fire


def _assert_refuses(gm_or_model: nn.Module, x: torch.Tensor, stats: dict, **options) -> None:
    result = assert_pass_preserves(
        TuneConvBN(**options), gm_or_model, (x,), expect_modified=bool(options)
    )
    assert dict(result.stats) == stats


def test_bn_in_training_mode_is_not_tuned():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _bn(nn.BatchNorm2d, 6), nn.ReLU())
    x = _x((4, 3, 6, 6))
    gm = fx.symbolic_trace(model.eval())
    gm.get_submodule("1").train()  # only the BN normalises with batch statistics
    reference = copy.deepcopy(gm)
    result = TuneConvBN(freeze_bn=True).run(gm, graphopt.PassContext())
    assert not result.modified
    assert dict(result.stats) == {"skipped:bn-training": 1}
    assert canonical_ir(gm) == canonical_ir(reference)
    cmp = compare(run_module(reference, (x,)), run_module(gm, (x,)), NUMERICS)
    assert cmp.ok, cmp.describe()


@pytest.mark.parametrize("freeze", [False, True], ids=["default", "freeze_bn"])
def test_bn_without_running_stats_is_not_tuned(freeze):
    bn = _bn(nn.BatchNorm2d, 6, track_running_stats=False)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn)
    result = assert_pass_preserves(
        TuneConvBN(freeze_bn=freeze), model, (_x((4, 3, 6, 6)),), expect_modified=False
    )
    assert dict(result.stats) == {"skipped:no-running-stats": 1}


@pytest.mark.parametrize("freeze", [False, True], ids=["default", "freeze_bn"])
def test_conv_output_used_elsewhere_is_not_tuned(freeze):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), _bn(nn.BatchNorm2d, 4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    stats = {"skipped:output-used-elsewhere": 1} | ({"frozen": 1} if freeze else {})
    result = assert_pass_preserves(
        TuneConvBN(freeze_bn=freeze), M(), (_x((2, 4, 6, 6)),), expect_modified=freeze
    )
    assert dict(result.stats) == stats
    assert tune_conv_bn not in _targets(result.graph)


def test_conv_subclass_with_its_own_forward_is_not_tuned():
    class StdConv2d(nn.Conv2d):
        """Weight standardisation: the weight used is not ``self.weight``."""

        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    model = nn.Sequential(StdConv2d(3, 6, 3, padding=1), _bn(nn.BatchNorm2d, 6))
    # the subclass kept as a module node, as capture(..., leaf_modules=[StdConv2d]) keeps it
    tracer = fx.Tracer()
    tracer.is_leaf_module = lambda m, name: isinstance(m, nn.Conv2d | nn.BatchNorm2d)
    gm = fx.GraphModule(model.eval(), tracer.trace(model))
    result = assert_pass_preserves(TuneConvBN(), gm, (_x((2, 3, 6, 6)),), expect_modified=False)
    assert dict(result.stats) == {"skipped:custom-conv": 1}


def test_conv_transpose_called_with_output_size_is_not_tuned():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.bn = nn.ConvTranspose2d(4, 3, 3, stride=2), _bn(nn.BatchNorm2d, 3)

        def forward(self, x):
            return self.bn(self.up(x, output_size=[12, 12]))

    _assert_refuses(M(), _x((2, 4, 5, 5)), {"skipped:output-size": 1})


def test_tune_mode_refuses_a_model_whose_batch_norms_train():
    model = _small_model().train()
    with pytest.raises(GraphoptError, match=r"3 BatchNorm layer\(s\) are in training mode: 1, 4"):
        graphopt.tune_mode(model)
    with pytest.raises(GraphoptError, match=r"Call model\.eval\(\) first"):
        graphopt.tune_mode(model)
    for m in model.modules():  # freezing only the BatchNorms is what the message suggests
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.eval()
    tuned = graphopt.tune_mode(model)
    assert tuned.training and tuned.get_submodule("5").training  # dropout as the user left it
    assert tuned.meta["graphopt.tune_conv_bn"] == {"tuned": 2, "frozen": 1}


def test_tune_mode_errors_name_the_problem():
    with pytest.raises(GraphoptError, match="takes a torch.nn.Module"):
        graphopt.tune_mode("model.onnx")

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.bn(self.conv(x))
            return x

    with pytest.raises(CaptureError, match=r"leaf_modules=\[Branchy\]"):
        graphopt.tune_mode(Branchy().eval())
    tuned = graphopt.tune_mode(nn.Sequential(Branchy()).eval(), leaf_modules=[Branchy])
    assert tuned.meta["graphopt.tune_conv_bn"] == {}  # kept opaque: nothing to tune inside


# ------------------------------------------------------------------------------------------------
# 4. properties on random CNNs (float64: see test_fold_conv_bn._float64 for why)


@settings(max_examples=40)
@given(random_cnns())
def test_random_cnns_train_like_eval_mode(case):
    model = copy.deepcopy(case.model).double()
    inputs = (case.inputs[0].double(),)
    tuned = graphopt.tune_mode(model, inputs)
    stats = tuned.meta["graphopt.tune_conv_bn"]
    # every BN left as a module is one without running statistics
    for target in _bn_modules_called(tuned):
        assert tuned.get_submodule(target).running_mean is None, (stats, tuned.code)
    _assert_trains_like(_eval_mode(model), tuned, inputs)
    _assert_trains_like(_eval_mode(model), tuned, (case.other_batch()[0].double(),), seed=1)


@settings(max_examples=40)
@given(random_cnns())
def test_random_cnns_pass_is_honest_and_idempotent(case):
    model = copy.deepcopy(case.model).double()
    inputs = (case.inputs[0].double(),)
    first = assert_pass_preserves(TuneConvBN(freeze_bn=True), model, inputs)
    printed = fingerprint(first.graph)
    second = TuneConvBN(freeze_bn=True).run(first.graph, graphopt.PassContext())
    assert not second.modified, dict(second.stats)
    assert fingerprint(second.graph) == printed


# ------------------------------------------------------------------------------------------------
# issue 15: inference mode, no_grad


def test_under_inference_mode(under_inference_mode):
    before = _ConvBNReLU()
    randomize_bn(before.bn, _gen())
    result = under_inference_mode(TuneConvBN(), before.eval(), (_x((2, 3, 6, 6)),))
    assert dict(result.stats) == {"tuned": 1}


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_tune_mode_called_under(mode):
    """#15.1: tune_mode called under torch.inference_mode() (where inference code often sets
    up the model) returned a copy whose parameters were inference tensors: the first
    ``loss.backward()`` failed ("Inference tensors cannot be saved for backward"). Now the copy
    is made outside inference mode and trains like Eval mode."""
    model = _small_model()
    x = _x((2, 3, 6, 6))
    with mode():
        tuned = graphopt.tune_mode(model, (x,))
    assert not any(t.is_inference() for t in tuned.state_dict(keep_vars=True).values())
    _assert_trains_like(_eval_mode(model, train=True), tuned.train(), (x,))

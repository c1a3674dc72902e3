"""remove-identity: structure, numerics (with another batch size), refusals, properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import fx, nn

from graphopt.core.printing import canonical_ir, fingerprint
from graphopt.frontends.torch import capture
from graphopt.passes.remove_identity import RemoveIdentity
from graphopt.testing import assert_pass_preserves, random_cnns, run_pass, verify_rewrite


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class _Fn(nn.Module):
    """A module around a plain function, so each case is one line."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# ------------------------------------------------------------------------------------------------
# 1. structure


def test_removes_identity_and_eval_dropout_modules():
    before = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.5), nn.ReLU(), nn.Dropout2d(0.2)
    )
    expected = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    result = verify_rewrite("remove-identity", before, expected, (_x(2, 3, 6, 6),))
    assert dict(result.stats) == {"identity": 1, "dropout": 2}


def test_removes_no_op_views_casts_and_neutral_arithmetic():
    def before(x):
        # relu's output is contiguous for every batch (its strides are recorded at capture)
        y = torch.relu(x).contiguous().float().permute(0, 1, 2).transpose(1, 1).view(-1, 3, 5)
        return torch.relu(y.flatten(2, 2) * 1 + 0)

    def expected(x):
        return torch.relu(torch.relu(x))

    result = verify_rewrite("remove-identity", _Fn(before), _Fn(expected), (_x(2, 3, 5),))
    assert dict(result.stats) == {
        "contiguous": 1,
        "cast": 1,
        "permute": 1,
        "transpose": 1,
        "reshape": 1,
        "flatten": 1,
        "mul-one": 1,
        "add-zero": 1,
    }


def test_removes_functional_dropout_traced_in_eval():
    class M(nn.Module):
        def forward(self, x):
            return torch.sigmoid(F.dropout(x, 0.3, self.training))

    result = verify_rewrite("remove-identity", M(), _Fn(torch.sigmoid), (_x(2, 6),))
    assert dict(result.stats) == {"dropout": 1}


# ------------------------------------------------------------------------------------------------
# 2. numerics, with a second batch size: a removal must hold for any batch


_REMOVED = {
    "reshape(size(0), -1) on 2-D": (lambda x: x.reshape(x.size(0), -1) + 1, (3, 8), "reshape"),
    "view(shape[0], -1) on 2-D": (lambda x: x.view(x.shape[0], -1) + 1, (3, 8), "reshape"),
    "reshape(-1, 8) on 2-D": (lambda x: torch.reshape(x, (-1, 8)) + 1, (3, 8), "reshape"),
    "reshape(size(0), -1, 2) on 3-D": (
        lambda x: x.reshape(x.size(0), -1, 2) + 1,
        (3, 4, 2),
        "reshape",
    ),
    "flatten(1) on 2-D": (lambda x: torch.flatten(x, 1) + 1, (3, 8), "flatten"),
    "x * 1": (lambda x: x * 1 - 2, (3, 8), "mul-one"),
    "1 * x": (lambda x: 1 * x - 2, (3, 8), "mul-one"),
    "x / 1": (lambda x: x / 1 - 2, (3, 8), "mul-one"),
    "torch.mul(x, 1.0)": (lambda x: torch.mul(x, 1.0) - 2, (3, 8), "mul-one"),
    "x + 0": (lambda x: (x + 0) * 2, (3, 8), "add-zero"),
    "0 + x": (lambda x: (0 + x) * 2, (3, 8), "add-zero"),
    "x - 0": (lambda x: (x - 0) * 2, (3, 8), "add-zero"),
    "x.to(float32)": (lambda x: x.to(torch.float32) * 2, (3, 8), "cast"),
    "permute(0, 1, 2)": (lambda x: x.permute(0, 1, 2) * 2, (3, 4, 2), "permute"),
}


@pytest.mark.parametrize("case", list(_REMOVED))
def test_removal_keeps_numerics_for_any_batch(case):
    fn, shape, kind = _REMOVED[case]
    more = [(_x(shape[0] + 4, *shape[1:], seed=2),), (_x(1, *shape[1:], seed=3),)]
    result = assert_pass_preserves(
        RemoveIdentity, _Fn(fn), (_x(*shape),), more_inputs=more, expect_modified=True
    )
    assert dict(result.stats) == {kind: 1}


# ------------------------------------------------------------------------------------------------
# 3. must not fire


def test_dropout_in_training_mode_is_kept():
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.ReLU())
    x = _x(4, 6)
    gm = capture(model, (x,)).graph  # capture deploys in eval mode ...
    gm.get_submodule("1").train()  # ... put the dropout back in training
    before = canonical_ir(gm)
    out, result = run_pass("remove-identity", gm, (x,))
    assert not result.modified
    assert dict(result.stats) == {"skipped:dropout-training": 1}
    assert canonical_ir(out) == before


@pytest.mark.parametrize("call", ["F.dropout", "F.dropout-kw", "torch.dropout"])
def test_functional_dropout_in_training_mode_is_kept(call):
    fn = {
        "F.dropout": lambda x: F.dropout(x, 0.5, True),
        "F.dropout-kw": lambda x: F.dropout(x, p=0.5),  # training defaults to True
        "torch.dropout": lambda x: torch.dropout(x, 0.5, True),
    }[call]
    gm, result = run_pass("remove-identity", _Fn(fn), (_x(4, 6),))
    assert not result.modified
    assert dict(result.stats) == {"skipped:dropout-training": 1}


def test_reshape_that_is_a_no_op_only_for_the_traced_batch_is_kept():
    """x.reshape(1, 8) on (1, 8) is the identity, but on (2, 8) it would fail: keep it."""
    result = assert_pass_preserves(
        RemoveIdentity, _Fn(lambda x: x.reshape(1, 8) + 1), (_x(1, 8),), expect_modified=False
    )
    assert dict(result.stats) == {"skipped:reshape-static-batch": 1}


def test_reshape_with_a_fixed_batch_and_minus_one_is_kept():
    """x.reshape(1, -1) on (1, 8): on (2, 8) it gives (1, 16)."""
    result = assert_pass_preserves(
        RemoveIdentity, _Fn(lambda x: x.reshape(1, -1) + 1), (_x(1, 8),), expect_modified=False
    )
    assert dict(result.stats) == {"skipped:reshape-static-batch": 1}


_KEPT = {
    "x + zeros(2, 3, 8) broadcasts": (lambda x: x + torch.zeros(2, 3, 8), (3, 8)),
    "x * ones(3, 8) is a tensor": (lambda x: x * torch.ones(3, 8), (3, 8)),
    "int x * 1.0 changes the dtype": (lambda x: x.long() * 1.0, (3, 8)),
    "int x / 1 changes the dtype": (lambda x: x.long() / 1, (3, 8)),
    "0 - x": (lambda x: 0 - x, (3, 8)),
    "1 / x": (lambda x: 1 / x, (3, 8)),
    "x * 2": (lambda x: x * 2, (3, 8)),
    "torch.add(x, 0, alpha=2)": (lambda x: torch.add(x, 0, alpha=2), (3, 8)),
    "x.to(float64)": (lambda x: x.to(torch.float64), (3, 8)),
    "x.half()": (lambda x: x.half(), (3, 8)),
    "permute(0, 2, 1)": (lambda x: x.permute(0, 2, 1), (3, 4, 2)),
    "transpose(1, 2)": (lambda x: x.transpose(1, 2), (3, 4, 2)),
    "flatten(1) on 3-D": (lambda x: x.flatten(1), (3, 4, 2)),
    "reshape(size(0), 2, 4) on (3, 4, 2)": (lambda x: x.reshape(x.size(0), 2, 4), (3, 4, 2)),
}


@pytest.mark.parametrize("case", list(_KEPT))
def test_ops_that_change_the_value_shape_or_dtype_are_kept(case):
    fn, shape = _KEPT[case]
    result = assert_pass_preserves(RemoveIdentity, _Fn(fn), (_x(*shape),), expect_modified=False)
    assert dict(result.stats) == {}


def test_neutral_op_whose_result_is_changed_in_place_is_kept():
    """y = x * 1 is a new tensor; without it, y.add_(1) would change x as well."""

    class M(nn.Module):
        def forward(self, x):
            y = x * 1
            y.add_(1)
            return x + y

    result = assert_pass_preserves(RemoveIdentity, M(), (_x(3, 4),), expect_modified=False)
    assert dict(result.stats) == {"skipped:inplace-user": 1}


def test_contiguous_copy_feeding_an_inplace_module_is_kept():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            t = x.transpose(1, 2)
            return t + self.relu(t.contiguous())

    result = assert_pass_preserves(RemoveIdentity, M(), (_x(2, 3, 4),), expect_modified=False)
    assert dict(result.stats) == {"skipped:inplace-user": 1}


def _window_partition(x, w: int = 2):
    """Swin's window partition: a permute, then ``.contiguous().view(...)``."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w * w, c)


@pytest.mark.parametrize("batch", [1, 2])
def test_contiguous_before_a_view_of_a_permuted_tensor_is_kept(batch):
    # at batch 1 the permuted tensor's strides hide the permutation; it is kept at both
    model = _Fn(lambda x: _window_partition(torch.relu(x)) * 2)
    result = assert_pass_preserves(
        RemoveIdentity,
        model,
        (_x(batch, 4, 4, 3),),
        more_inputs=[(_x(3, 4, 4, 3, seed=2),)],
        expect_modified=False,
    )
    assert dict(result.stats) == {"skipped:contiguous-before-view": 1}
    gm, _ = run_pass(RemoveIdentity, model, (_x(batch, 4, 4, 3),))
    assert sum(n.target == "contiguous" for n in gm.graph.nodes) == 1


def test_contiguous_before_a_view_through_a_transpose_is_kept():
    def fn(x):
        return x.permute(0, 2, 1).contiguous().transpose(1, 1).view(x.shape[0], -1)

    result = assert_pass_preserves(
        RemoveIdentity, _Fn(fn), (_x(2, 3, 5),), more_inputs=[(_x(4, 3, 5),)]
    )
    assert result.stats["skipped:contiguous-before-view"] == 1
    assert result.stats["transpose"] == 1


def test_contiguous_of_a_graph_input_before_a_view_is_kept():
    # the caller may pass any strides: an input is never provably contiguous
    model = _Fn(lambda x: x.contiguous().view(-1, 15))
    gm, result = run_pass(RemoveIdentity, model, (_x(2, 3, 5),))
    assert dict(result.stats) == {"skipped:contiguous-before-view": 1}
    gm(_x(5, 3, 2).transpose(1, 2))  # a non-contiguous input still runs


# ------------------------------------------------------------------------------------------------
# 4. properties on random CNNs (Identity, eval Dropout, no-op flatten in the head)


@given(random_cnns())
def test_random_cnns_keep_numerics_report_honestly_and_are_idempotent(case):
    result = assert_pass_preserves(
        RemoveIdentity, case.model, case.inputs, more_inputs=[case.other_batch()]
    )
    printed = fingerprint(result.graph)
    again, second = run_pass(RemoveIdentity(), copy.deepcopy(result.graph), case.inputs)
    assert not second.modified, dict(second.stats)
    assert fingerprint(again) == printed
    assert not [
        n
        for n in again.graph.nodes
        if n.op == "call_module"
        and isinstance(again.get_submodule(n.target), nn.Identity | nn.Dropout)
    ]


def test_removed_nodes_leave_no_dangling_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Dropout())
    gm, result = run_pass("remove-identity", model, (_x(2, 4),))
    assert dict(result.stats) == {"identity": 1, "dropout": 1}
    assert [name for name, _ in gm.named_children()] == ["0"]
    assert isinstance(gm, fx.GraphModule)


def test_under_inference_mode(under_inference_mode):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.5), nn.ReLU(), nn.Dropout2d(0.2)
    ).eval()
    result = under_inference_mode(RemoveIdentity(), model, (_x(2, 3, 6, 6),))
    assert dict(result.stats) == {"identity": 1, "dropout": 2}

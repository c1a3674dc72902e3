"""``Optimizer``: the options of ``optimize()`` checked once, reusable across models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from graphopt.api import Optimizer, optimize
from graphopt.errors import ArgumentError, BackendError, GraphoptError, InputError, TargetError
from graphopt.lowering.int8 import plan_precision
from graphopt.pipeline import parse_pipeline


def _net(channels: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
    ).eval()


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"trials": -1}, ArgumentError, "trials"),
        ({"tune_minutes": 0}, ArgumentError, "tune_minutes"),
        ({"instruments": [object()]}, ArgumentError, "Instrument"),
        ({"backend": "tv"}, BackendError, "tvm"),
        ({"target": "not-a-target"}, TargetError, "not-a-target"),
        ({"precision": "int4"}, GraphoptError, "int8"),
        ({"max_drop": 0.01}, GraphoptError, "precision='int8'"),
    ],
)
def test_options_are_checked_when_the_optimizer_is_made(options, error, words):
    with pytest.raises(error, match=words):
        Optimizer(**options)


def test_one_optimizer_serves_several_models_like_optimize():
    optimizer = Optimizer(pipeline="fold-conv-bn,eliminate-dead-code", measure=False)
    for channels in (4, 6):
        model, x = _net(channels), torch.randn(2, 3, 8, 8)
        result = optimizer.optimize(model, (x,), name=f"net{channels}")
        alone = optimize(
            model, "cpu", (x,), pipeline="fold-conv-bn,eliminate-dead-code", measure=False
        )
        assert result.report.model == f"net{channels}"
        assert result.report.pipeline == alone.report.pipeline
        assert result.report.artifact_error.ok
        assert torch.equal(result(x), alone(x))


def test_the_options_resolve_once_and_replace_resolves_again():
    fp32 = Optimizer(pipeline="fold-conv-bn", measure=False)
    assert not fp32.int8 and str(fp32.parsed_pipeline) == "fold-conv-bn"
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp32.precision = "int8"
    int8 = dataclasses.replace(fp32, precision="int8")
    assert int8.int8 and [s.name for s in int8.parsed_pipeline][-1] == "insert-qdq"


def test_int8_without_calibration_data_fails_before_capture():
    optimizer = Optimizer(precision="int8")
    with pytest.raises(InputError, match="calibration data"):
        optimizer.optimize(object(), None)  # not a model at all: capture never ran


def test_a_pipeline_with_insert_qdq_is_int8_and_max_drop_lands_on_its_pass():
    pipe = parse_pipeline("fold-conv-bn,insert-qdq{method=minmax}")
    planned, int8 = plan_precision("fp32", pipe, 0.02)
    assert int8 and [s.name for s in planned] == ["fold-conv-bn", "insert-qdq"]
    assert str(planned) == "fold-conv-bn,insert-qdq{method=minmax,max_drop=0.02}"
    assert plan_precision("fp32", parse_pipeline("fold-conv-bn"), None) == (
        parse_pipeline("fold-conv-bn"),
        False,
    )

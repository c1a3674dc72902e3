"""Pipeline strings: parse, print back, and the errors a user sees."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from graphopt.core.options import check_option, option_fields
from graphopt.core.pass_infra import Pass
from graphopt.core.registry import _REGISTRY, get_pass, register_pass, registered_passes
from graphopt.errors import PipelineError
from graphopt.passes import FoldConvBN
from graphopt.pipeline import parse_pipeline


@pytest.mark.parametrize(
    "text",
    [
        "fold-conv-bn",
        "fold-conv-bn,eliminate-dead-code",
        "fold-conv-bn{include_linear=false}",
        "remove-identity,fold-constants{max_elements=1024},fold-conv-bn{include_linear=true,bn_before=false},eliminate-dead-code",
        "",
    ],
)
def test_round_trip_is_identical(text):
    assert str(parse_pipeline(text)) == text


def test_whitespace_is_normalised_and_reparses_the_same():
    pipe = parse_pipeline("  fold-conv-bn { include_linear = false } ,  eliminate-dead-code ")
    assert str(pipe) == "fold-conv-bn{include_linear=false},eliminate-dead-code"
    assert parse_pipeline(str(pipe)) == pipe


def test_options_reach_the_pass():
    (p,) = parse_pipeline("fold-conv-bn{include_linear=false,bn_before=0}").instantiate()
    assert isinstance(p, FoldConvBN)
    assert p.options == FoldConvBN.Options(include_linear=False, bn_before=False)
    assert str(p) == "fold-conv-bn{include_linear=false,bn_before=false}"


def test_unknown_pass_suggests_close_names():
    with pytest.raises(
        PipelineError, match=r"unknown pass 'fold-conv-nb'.*Did you mean 'fold-conv-bn'"
    ):
        parse_pipeline("eliminate-dead-code,fold-conv-nb")


def test_unknown_pass_error_has_a_caret_under_it():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("eliminate-dead-code,fold-conv-nb")
    lines = str(info.value).splitlines()
    assert lines[-2].strip() == "eliminate-dead-code,fold-conv-nb"
    assert lines[-1].index("^") == lines[-2].index("fold-conv-nb")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(
        PipelineError,
        match=r"no option 'include_lin'.*Did you mean "
        r"'include_linear'.*Valid options: include_linear, bn_before",
    ):
        parse_pipeline("fold-conv-bn{include_lin=true}")


def test_bad_option_value():
    with pytest.raises(PipelineError, match="bad value 'maybe' for option 'include_linear'"):
        parse_pipeline("fold-conv-bn{include_linear=maybe}")
    with pytest.raises(PipelineError, match="max_elements"):
        parse_pipeline("fold-constants{max_elements=lots}")


@pytest.mark.parametrize(
    "text, column",
    [
        ("fold-conv-bn{include_linear=true", 33),  # missing }
        ("fold-conv-bn,,eliminate-dead-code", 14),  # empty pass
        ("fold-conv-bn eliminate-dead-code", 14),  # missing comma
        ("Fold-Conv-BN", 1),  # not kebab-case
        ("fold-conv-bn{include_linear=true,include_linear=false}", 34),
    ],
)
def test_syntax_errors_point_at_the_column(text, column):
    with pytest.raises(PipelineError, match=f"column {column}:") as info:
        parse_pipeline(text)
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line.index("^") - 2 == column - 1


def test_not_a_string():
    with pytest.raises(PipelineError, match="a pipeline is a string"):
        parse_pipeline(["fold-conv-bn"])


def test_registry_lists_builtin_passes_with_docs():
    passes = registered_passes()
    for name in ("fold-conv-bn", "eliminate-dead-code", "remove-identity", "fold-constants"):
        assert name in passes
        cls = passes[name]
        assert cls.name == name and cls.__doc__
        assert cls.__module__.endswith(name.replace("-", "_"))


# ------------------------------------------------------------------------------------------------
# option values are checked where they are made (issue 15, item 15)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("merge-convs{budget=nan}", "bad value 'nan' for option 'budget' of pass 'merge-convs'"),
        ("merge-convs{budget=-0.5}", "option 'budget' of pass 'merge-convs': out of range"),
        ("merge-convs{max_time_s=inf}", "expected a finite number"),
        ("equalize-layers{tolerance=-1}", "valid: numbers >= 0"),
        ("equalize-layers{max_sweeps=-3}", "valid: integers >= 0"),
        ("fold-constants{max_elements=-5}", "option 'max_elements' of pass 'fold-constants'"),
        ("substitute-monarch{calibration_rows=-1}", "out of range"),
        ("merge-convs{runs=3.5}", "expected an integer"),
        ("merge-convs{budget=lots}", "expected a number"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time_with_a_caret(text, needle):
    with pytest.raises(PipelineError, match=re.escape(needle)) as info:
        parse_pipeline(text)
    lines = str(info.value).splitlines()
    assert lines[-1].index("^") == lines[-2].index("=") + 1  # under the value


def test_every_registered_default_is_valid():
    for cls in registered_passes().values():
        cls()  # checks each default against the rules
        for name, f in option_fields(cls).items():
            if f.default is not dataclasses.MISSING:
                assert check_option(cls, name, f.default) == f.default


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"budget": "0.1"}, "expected a float, got str. Give the number itself: budget=0.1"),
        ({"budget": float("nan")}, "bad value nan for option 'budget'"),
        ({"budget_ms": -1.0}, "valid: numbers >= 0"),
        ({"runs": True}, "expected an integer, got bool"),
        ({"cache": "yes"}, "expected true or false"),
        ({"resolution": None}, "expected an integer, got None"),
    ],
)
def test_pass_constructor_checks_values_like_the_parser(values, needle):
    with pytest.raises(PipelineError, match=re.escape(needle)):
        get_pass("merge-convs")(**values)


def test_options_object_and_replace_are_checked_too():
    options = get_pass("equalize-layers").Options
    with pytest.raises(PipelineError, match="'tolerance' of pass 'equalize-layers'"):
        options(tolerance=float("-inf"))
    with pytest.raises(PipelineError, match="'max_sweeps'"):
        dataclasses.replace(options(), max_sweeps=-1)


def test_an_int_for_a_float_option_is_stored_as_the_parser_would():
    p = get_pass("merge-convs")(max_time_s=5)
    assert p.options.max_time_s == 5.0 and isinstance(p.options.max_time_s, float)
    assert str(p) == str(parse_pipeline("merge-convs{max_time_s=5}").instantiate()[0])


def test_optional_float_accepts_none_in_a_pipeline_string():
    (spec,) = parse_pipeline("insert-qdq{max_drop=none}")
    assert spec.instantiate().options.max_drop is None
    with pytest.raises(PipelineError, match="'max_drop'.*out of range"):
        parse_pipeline("insert-qdq{max_drop=-0.1}")


def test_metadata_bounds_and_negative_defaults():
    class CheckBounds(Pass):
        name = "test-check-bounds"

        @dataclasses.dataclass(frozen=True)
        class Options:
            fraction: float = dataclasses.field(default=0.5, metadata={"min": 0, "max": 1})
            offset: int = -1  # a negative default: negative values are meant
            shift: float = dataclasses.field(default=0.0, metadata={"min": None})
            mode: typing.Literal["a", "b"] = "a"

    register_pass(CheckBounds)
    try:
        assert CheckBounds(offset=-7, shift=-2.5).options.offset == -7
        with pytest.raises(PipelineError, match=re.escape("valid: numbers in [0, 1]")):
            parse_pipeline("test-check-bounds{fraction=1.5}")
        with pytest.raises(PipelineError, match=re.escape("valid: numbers in [0, 1]")):
            CheckBounds(fraction=-0.1)
        with pytest.raises(PipelineError, match="expected one of 'a', 'b'"):
            CheckBounds(mode="c")
        assert str(parse_pipeline("test-check-bounds{shift=-1.5,offset=-2}")) == (
            "test-check-bounds{shift=-1.5,offset=-2}"
        )
    finally:
        _REGISTRY.pop("test-check-bounds", None)

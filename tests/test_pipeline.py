"""Pipeline strings: parse, print back, and the errors a user sees."""

from __future__ import annotations

import pytest

from graphopt.errors import PipelineError
from graphopt.passes import FoldConvBN
from graphopt.pipeline import parse_pipeline, registered_passes


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

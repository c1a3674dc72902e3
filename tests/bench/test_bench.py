"""Tests of graphopt.bench: the harness behind ``graphopt bench`` and benchmarks/bench_zoo.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
import torch

from graphopt import bench, cli

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def digits_result() -> dict:
    results = bench.run_benchmark(
        ["digits_cnn"], runs=3, warmup=1, compile=False, openvino=False, progress=False
    )
    assert len(results) == 1
    return results[0]


def test_structure(digits_result: dict) -> None:
    res = digits_result
    assert res["model"] == "digits_cnn"
    assert res["batch"] == 1
    assert res["input_shapes"] == [[1, 1, 8, 8]]
    assert res["threads"]["torch"] >= 1 and res["threads"]["onnxruntime"] >= 1
    # every runner either ran or says why not
    assert set(res["runners"]) == {bench.EAGER, bench.ORT, bench.GRAPHOPT}
    assert set(res["runners"]) | set(res["skipped"]) == set(bench.RUNNERS)
    assert res["skipped"][bench.COMPILE].startswith("disabled")
    assert res["skipped"][bench.OPENVINO].startswith("disabled")
    for entry in res["runners"].values():
        assert entry["median_ms"] > 0 and entry["runs"] == 3
        assert entry["p10_ms"] <= entry["median_ms"] <= entry["p90_ms"]


def test_ratios_match_medians(digits_result: dict) -> None:
    runners, ratios = digits_result["runners"], digits_result["ratios"]
    eager = runners[bench.EAGER]["median_ms"]
    for entry in runners.values():
        assert math.isclose(entry["speedup_vs_eager"], eager / entry["median_ms"], rel_tol=1e-9)
    assert math.isclose(
        ratios["graphopt vs eager"], eager / runners[bench.GRAPHOPT]["median_ms"], rel_tol=1e-9
    )
    assert math.isclose(
        ratios["graphopt vs onnxruntime"],
        runners[bench.ORT]["median_ms"] / runners[bench.GRAPHOPT]["median_ms"],
        rel_tol=1e-9,
    )
    assert ratios["torch.compile vs eager"] is None
    assert ratios["openvino vs eager"] is None


def test_outputs_checked_against_eager(digits_result: dict) -> None:
    runners = digits_result["runners"]
    assert runners[bench.EAGER]["rel_error"] == 0.0
    assert runners[bench.GRAPHOPT]["rel_error"] < 1e-4
    assert runners[bench.ORT]["rel_error"] < 1e-4
    err = digits_result["graphopt_artifact_error"]
    assert err is not None and err["ok"] and err["measured"] <= err["allowed"]
    assert digits_result["compile_s"][bench.GRAPHOPT] > 0
    ops = digits_result["onnx_ops"]
    assert ops[bench.ORT]["Conv"] >= 1 and ops[bench.GRAPHOPT]["Conv"] >= 1
    assert digits_result["graphopt_changed_graph"] == (ops[bench.ORT] != ops[bench.GRAPHOPT])


def test_markdown_table(digits_result: dict) -> None:
    table = bench.markdown_table([digits_result])
    assert "digits_cnn" in table
    assert "graphopt vs ORT" in table and "torch.compile vs eager" in table
    row = next(line for line in table.splitlines() if line.startswith("| digits_cnn"))
    assert row.count("|") == table.splitlines()[2].count("|")  # as many cells as the header
    assert "!" not in row  # no output mismatch


def test_markdown_flags_mismatch_and_failures() -> None:
    def entry(ms: float, err: float = 0.0) -> dict:
        return {
            "median_ms": ms,
            "p10_ms": ms,
            "p90_ms": ms,
            "runs": 5,
            "rel_error": err,
            "speedup_vs_eager": 10.0 / ms,
        }

    res = {
        "model": "m",
        "runners": {
            bench.EAGER: entry(10.0),
            bench.ORT: entry(2.0),
            bench.GRAPHOPT: entry(1234.5, err=0.5),
        },
        "ratios": {
            "graphopt vs eager": 10 / 1234.5,
            "graphopt vs onnxruntime": 2 / 1234.5,
            "torch.compile vs eager": None,
        },
        "skipped": {
            bench.COMPILE: "RuntimeError: no C compiler",
            bench.OPENVINO: "disabled (--no-openvino)",
        },
        "other_cpu_while_timing": 1.2,
    }
    table = bench.markdown_table([res], machine={"cpu": "X", "cores": 2})
    row = next(line for line in table.splitlines() if line.startswith("| m "))
    assert "1234 !" in row or "1235 !" in row  # no exponent notation, flagged
    assert "e+" not in row
    assert "m, graphopt: output differs from eager" in table
    assert "m, torch.compile: RuntimeError: no C compiler" in table
    assert "--no-openvino" not in table  # deliberately skipped: no note
    assert "other processes used up to 1.2 cores" in table


def test_a_ratio_from_a_busy_machine_is_marked_noisy_with_its_range() -> None:
    """What a loaded machine gave (issue 18: "6616x"): torch eager's tiny CNN at 312 ms
    median with a p10-p90 of 20-900 ms against graphopt's 0.066 ms. The ratio keeps its
    median, but the cell says how far the runners' spreads let it range."""

    def entry(median: float, p10: float, p90: float) -> dict:
        return {"median_ms": median, "p10_ms": p10, "p90_ms": p90, "runs": 10, "rel_error": 0.0}

    runners = {
        bench.EAGER: entry(312.0, 20.0, 900.0),
        bench.ORT: entry(0.058, 0.055, 0.061),
        bench.GRAPHOPT: entry(0.066, 0.060, 0.070),
    }
    res = {
        "model": "m",
        "runners": runners,
        "ratios": {
            "graphopt vs eager": 312.0 / 0.066,
            "graphopt vs onnxruntime": 0.058 / 0.066,
            "torch.compile vs eager": None,
        },
        "skipped": {},
    }
    table = bench.markdown_table([res])
    row = next(line for line in table.splitlines() if line.startswith("| m "))
    assert "4727x (noisy: 286x-15000x)" in row, row
    assert "0.88x |" in row  # ORT vs graphopt: tight spreads, no mark
    assert "a ratio marked noisy spans that range" in table


def test_failing_runner_is_recorded_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    [res] = bench.run_benchmark(
        ["digits_cnn"], runs=2, warmup=1, compile=True, openvino=True, progress=False
    )
    assert bench.COMPILE not in res["runners"]
    assert res["skipped"][bench.COMPILE] == "RuntimeError: no C compiler found"
    assert res["ratios"]["torch.compile vs eager"] is None
    assert bench.GRAPHOPT in res["runners"]
    import torch._inductor.config as inductor_config

    assert inductor_config.freezing is False  # the flag is restored
    if HAS_OPENVINO:
        ov = res["runners"][bench.OPENVINO]
        assert ov["median_ms"] > 0 and ov["rel_error"] < 1e-4  # f32, not bf16
        assert res["ratios"]["openvino vs eager"] > 0
    else:
        assert res["skipped"][bench.OPENVINO] == bench.OPENVINO_MISSING


def test_cli_bench_writes_json_and_markdown(tmp_path) -> None:
    rc = cli.main(
        [
            "bench",
            "digits_cnn",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--no-compile",
            "--no-openvino",
            "--wait-idle-s",
            "1",
            "--json",
            str(tmp_path / "r.json"),
            "--markdown",
            str(tmp_path / "r.md"),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["complete"] is True
    assert data["settings"]["runs"] == 2 and data["settings"]["compile"] is False
    assert data["settings"]["rewarm"] == 2 and data["settings"]["wait_idle_s"] == 1
    assert data["results"][0]["timing_attempts"] in (1, 2)
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__
    assert [r["model"] for r in data["results"]] == ["digits_cnn"]
    assert "digits_cnn" in (tmp_path / "r.md").read_text()


def test_cli_bench_unknown_model_fails_fast(capsys) -> None:
    assert cli.main(["bench", "resnet19", "--no-compile"]) == 2
    assert "resnet19" in capsys.readouterr().err


def test_arguments_defaults() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    assert args.models == [] and args.runs == 30 and args.warmup == 5
    assert args.max_time_s == 60 and not args.no_compile and not args.no_openvino
    assert args.rewarm == bench.REWARM == 2
    assert args.json is None and args.markdown is None


@pytest.mark.slow
def test_torch_compile_runner() -> None:
    """The real torch.compile path (inductor compiles C++: tens of seconds on 2 cores)."""
    [res] = bench.run_benchmark(
        ["digits_cnn"], runs=3, warmup=1, compile=True, openvino=False, progress=False
    )
    if bench.COMPILE in res["skipped"]:
        pytest.skip(f"torch.compile unavailable here: {res['skipped'][bench.COMPILE]}")
    entry = res["runners"][bench.COMPILE]
    assert entry["median_ms"] > 0 and entry["rel_error"] < 1e-4
    assert res["compile_s"][bench.COMPILE] > 0
    assert res["ratios"]["torch.compile vs eager"] > 0

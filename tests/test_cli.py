"""The graphopt command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from graphopt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_optimize_zoo_model_prints_report_and_writes_files(tmp_path, capsys):
    out, report = tmp_path / "d.onnx", tmp_path / "r.json"
    code = main(
        ["optimize", "digits_cnn", "--target", "cpu", "-o", str(out), "--json", str(report)]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "graphopt report: digits_cnn -> cpu" in captured.out
    assert "fold-conv-bn" in captured.out and "latency" in captured.out
    assert "[3/5] fold-conv-bn" in captured.err  # progress on stderr
    assert onnx.load(str(out)).graph.node
    data = json.loads(report.read_text())
    assert data["records"][2]["stats"] == {"folded": 2}
    assert data["artifact_error"]["ok"] is True


def test_optimize_onnx_file_with_pipeline(tmp_path, capsys):
    assert (
        main(["optimize", "digits_cnn", "--no-measure", "-q", "-o", str(tmp_path / "a.onnx")]) == 0
    )
    capsys.readouterr()
    code = main(
        [
            "optimize",
            str(tmp_path / "a.onnx"),
            "--pipeline",
            "eliminate-dead-code",
            "--no-measure",
            "-q",
            "--print-ir",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "captured with onnx" in captured.out


def test_errors_are_one_clear_line_and_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    for argv, needle in [
        (["optimize", str(bad)], "graphopt: error:"),
        (["optimize", "resnet19"], "Did you mean 'resnet18'"),
        (["optimize", "digits_cnn", "--target", "tpu"], "unknown target 'tpu'"),
        (["optimize", "digits_cnn", "--pipeline", "fold-conv-bn{x=1}"], "Valid options"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_passes_lists_every_pass_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in (
        "fold-conv-bn  [exact]",
        "remove-identity",
        "fold-constants",
        "eliminate-dead-code",
        "option include_linear: bool = True",
    ):
        assert name in out


def test_zoo_lists_models(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "digits_cnn" in out


def test_python_dash_m_and_custom_pass_example():
    out = subprocess.run(
        [sys.executable, "-m", "graphopt", "passes"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "fold-conv-bn" in out.stdout
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_pass.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "('drop-double-neg', 'ok', {'removed': 1})" in out.stdout


def test_optimize_int8_with_npz_calibration(tmp_path, capsys):
    import numpy as np

    from graphopt import zoo

    data = tmp_path / "calib.npz"
    np.savez(data, zoo.digits_data("train")[0][:128].numpy())
    out = tmp_path / "d.int8.onnx"
    argv = ["optimize", "digits_cnn", "--int8", "--calibration", str(data), "--no-measure"]
    code = main([*argv, "--max-drop", "0.01", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "int8: 3 of 3 layers int8" in captured.out
    assert "calibrating [####################] 4/4 batches" in captured.err  # progress bar
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert main(["optimize", "digits_cnn", "--int8", "-q", "--no-measure"]) == 2
    assert "calibration_data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# every error is one line on stderr and status 2 (issue 15, item 15)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graphopt: error: ") and "Traceback" not in err
    return lines[0]


def _bad_npz(tmp_path, kind: str) -> Path:
    import numpy as np

    path = tmp_path / f"{kind}.npz"
    if kind == "garbage":
        path.write_bytes(b"PK\x03\x04 this is not a zip")
    elif kind == "truncated":
        np.savez(path, np.zeros((64, 1, 8, 8), np.float32))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "crc":
        np.savez(path, np.arange(4000, dtype=np.float32).reshape(1000, 4))
        data = bytearray(path.read_bytes())
        data[300] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((4, 1, 8, 8), np.float32))
    elif kind == "strings":
        np.savez(path, np.array(["a", "b"]))
    elif kind == "nan":
        np.savez(path, np.full((4, 1, 8, 8), np.nan, np.float32))
    return path


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("garbage", "is damaged or not an .npz archive"),
        ("truncated", "is damaged or not an .npz archive"),
        ("crc", "Bad CRC-32"),
        ("npy", "is a single .npy array"),
        ("strings", "has dtype <U1; calibration samples are numbers"),
        ("nan", "holds NaN or infinite values"),
        ("missing", "no such file"),
    ],
)
def test_bad_calibration_file_is_one_line_and_status_2(tmp_path, capsys, kind, needle):
    path = _bad_npz(tmp_path, kind) if kind != "missing" else tmp_path / "none.npz"
    argv = ["optimize", "digits_cnn", "--int8", "--calibration", str(path), "--no-measure"]
    assert main(argv) == 2
    assert needle in _one_error_line(capsys)


def test_corrupt_npz_in_a_subprocess_exits_2_with_one_line(tmp_path):
    path = _bad_npz(tmp_path, "truncated")
    out = subprocess.run(
        [sys.executable, "-m", "graphopt", "optimize", "digits_cnn", "--int8"]
        + ["--calibration", str(path), "--no-measure"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("graphopt: error: ")
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["optimize", "digits_cnn", "--pipeline", "fold-conv-nb"], "at column 1: fold-conv-nb"),
        (["optimize", "digits_cnn", "--pipeline", "merge-convs{budget=nan}"], "finite number"),
        (["optimize", "digits_cnn", "--target", "llvm -mcpu=notacpu"], "unknown -mcpu=notacpu"),
        (["optimize", "digits_cnn", "--target", "llvm -mtriple=foo-bar-baz"], "-mtriple"),
        (["optimize", "resnet19"], "Did you mean 'resnet18'"),
        (["optimize", "missing.onnx"], "missing.onnx: no such file"),
        (["optimize", "model.pt"], "no such file, and not a zoo model"),
        (["optimize", "digits_cnn", "--trials", "-3"], "--trials: expected an integer >= 0"),
        (["optimize", "digits_cnn", "--tune-minutes", "nan"], "expected a finite number"),
        (["optimize", "digits_cnn", "--int8", "--max-drop", "-0.1"], "--max-drop"),
        (["optimize", "digits_cnn", "--calibration-batch", "0"], "integer >= 1"),
        (["optimize", "digits_cnn", "-o", "no/such/dir/x.onnx"], "does not exist"),
        (["optimize", "digits_cnn", "--max-drop", "0.1"], "add --int8"),
        (["optimize"], "the following arguments are required: model"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_are_one_line_and_status_2(capsys, monkeypatch, tmp_path, argv, needle):
    monkeypatch.chdir(tmp_path)  # relative paths above do not exist there
    assert main(argv) == 2
    assert needle in _one_error_line(capsys)


def test_output_directory_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import graphopt.zoo

    monkeypatch.setattr(graphopt.zoo, "get", lambda *a, **k: pytest.fail("model was built"))
    assert main(["optimize", "digits_cnn", "--json", str(tmp_path)]) == 2
    assert "is a directory" in _one_error_line(capsys)


def test_unexpected_error_is_one_line_with_a_debug_hint(capsys, monkeypatch):
    import graphopt.zoo

    def broken():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(graphopt.zoo, "names", broken)
    assert main(["zoo"]) == 2
    line = _one_error_line(capsys)
    assert "unexpected RuntimeError: boom second line" in line
    assert "Rerun with --debug" in line


def test_debug_prints_the_traceback(capsys, monkeypatch):
    import graphopt.zoo

    monkeypatch.setattr(graphopt.zoo, "names", lambda: 1 / 0)
    assert main(["zoo", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.splitlines()[-1].startswith("graphopt: error: unexpected ZeroDivisionError")
    assert main(["--debug", "optimize", "digits_cnn", "--target", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "TargetError" in err


def test_keyboard_interrupt_exits_130_quietly(capsys, monkeypatch):
    import graphopt.zoo

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(graphopt.zoo, "names", interrupted)
    assert main(["zoo"]) == 130
    assert capsys.readouterr().err == ""


def test_version(capsys):
    import graphopt

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"graphopt {graphopt.__version__}"


# ------------------------------------------------------------------------------------------------
# the report the CLI prints never fails on what a run left behind


def _report(**fields):
    from graphopt.report import Report

    return Report("m", "cpu", "onnxruntime", "1.0", "fold-conv-bn", "fx", **fields)


def test_report_with_nan_and_zero_latencies_prints_and_writes_strict_json():
    from graphopt.backends.measure import Latency

    nan = float("nan")
    report = _report(
        latency_baseline=Latency(1.0, 0.9, 1.1, 10),
        latency_optimized=Latency(0.0, 0.0, 0.0, 10),
        backend_latencies={"onnxruntime": Latency(nan, nan, nan, 0)},
        ort_settings_latencies={"default": Latency(float("inf"), 1.0, 1.0, 3)},
        baseline_name="onnxruntime",
    )
    assert report.speedup is None  # was ZeroDivisionError
    text = str(report)
    assert "no speedup: a latency is not a valid measurement" in text
    assert "onnxruntime n/a (measured nan ms)" in text
    data = json.loads(report.to_json())  # json.loads accepts NaN; the text must not hold one
    assert "NaN" not in report.to_json() and "Infinity" not in report.to_json()
    assert data["backend_latencies"]["onnxruntime"]["median_ms"] is None
    assert data["speedup"] is None
    report.latency_baseline = Latency(nan, nan, nan, 1)
    report.latency_optimized = Latency(2.0, 2.0, 2.0, 1)
    assert report.speedup is None and "n/a" in str(report)


def test_report_with_missing_fields_prints():
    import numpy as np

    from graphopt.core.numerics import Comparison
    from graphopt.pipeline import PassRecord

    bad = Comparison(ok=False, metric="max_abs", measured=None, allowed=1e-5, output="out")
    record = PassRecord(0, "fold-conv-bn", "fold-conv-bn", "exact", time_s=None, comparison=bad)
    report = _report(
        records=[record],
        graph_error=bad,
        tvm_tasks=[{"name": "conv"}, {"status": "tuned"}],
        tvm_tuning={"summary": "1 trial", "best": np.float32("nan")},
    )
    text = str(report)
    assert "Comparison(metric='max_abs', measured=None" in text
    assert "TVM tasks: 2 (1 tuned, 0 default, 0 naive, 1 unknown)" in text
    assert report.untuned_tasks == ["conv"]
    data = json.loads(report.to_json())
    assert data["tvm_tuning"]["best"] is None


def _conv_file(path: Path) -> None:
    """A small conv net exported with symbolic batch, height and width."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["features"],
        dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}, "features": {0: "N", 2: "H", 3: "W"}},
    )


def test_input_shape_and_dynamic_axes_from_the_command_line(tmp_path, capsys):
    src, out = tmp_path / "net.onnx", tmp_path / "out.onnx"
    _conv_file(src)
    # H and W have no size to guess: the command says which flag gives one
    assert main(["optimize", str(src), "--no-measure", "-q"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    argv = ["optimize", str(src), "--no-measure", "-q", "-o", str(out)]
    assert main([*argv, "--input-shape", "image:1x3x16x12"]) == 0
    dims = [
        d.dim_param or d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims == ["N", 3, "H", "W"]  # the file's own symbolic dims
    # --dynamic-axes narrows them: only the batch stays free
    assert main([*argv, "--input-shape", "image:1x3x16x12", "--dynamic-axes", "image:0=N"]) == 0
    dims = [
        d.dim_param or d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims == ["N", 3, 16, 12]
    assert main([*argv, "--dynamic-axes", "image"]) == 2
    assert "INPUT:AXIS" in capsys.readouterr().err


def test_the_printed_report_has_what_save_noted(tmp_path):
    """TVM's log lines during save() are kept off stderr and summarized into the report's
    notes; the CLI saves before it prints the report, so they are in what it prints."""
    out = subprocess.run(
        [sys.executable, "-m", "graphopt", "optimize", "digits_cnn", "--backend", "tvm"]
        + ["--no-measure", "-q", "-o", str(tmp_path / "d.so")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "note: save():" in out.stdout
    assert "Scope Saving" not in out.stderr
    assert out.stdout.index("note: save():") < out.stdout.index("saved ")

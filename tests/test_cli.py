"""The graphopt command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

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

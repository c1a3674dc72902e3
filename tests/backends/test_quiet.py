"""Dependencies' log lines are kept off stderr and summarized into the report's notes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from graphopt.backends.quiet import is_log_line, summarize

TVM_LINE = "[17:55:39] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:"
ORT_LINE = (
    "\x1b[0;93m2026-12-06 17:57:12.904084156 [W:onnxruntime:, graph.cc:128 MergeShapeInfo] "
    "Error merging shape info for output. 'y' source:{1,4} target:{1,5}.\x1b[m"
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_log_lines_recognised_and_others_not():
    assert is_log_line(TVM_LINE) and is_log_line(ORT_LINE)
    for other in ("[   3.2s] lowering to tvm", "graphopt report: x", "\r 40%|####", ""):
        assert not is_log_line(other)


def test_summary_is_count_and_first_example_per_kind():
    notes = summarize([TVM_LINE] * 300 + [ORT_LINE.replace("\x1b[0;93m", "").replace("\x1b[m", "")])
    assert notes == [
        'TVM printed 300 warning lines (executable.cc:276), e.g. "Scope Saving:" '
        "(captured, not shown)",
        'ONNX Runtime printed 1 warning line (graph.cc:128 MergeShapeInfo), e.g. "Error merging '
        "shape info for output. 'y' source:{1,4} target:{1,5}.\" (captured, not shown)",
    ]


def test_fd_level_capture_passes_other_output_through():
    """C-level writes to fd 2 (as TVM's and ORT's loggers make) are kept; the rest passes, and a
    real ONNX Runtime warning (a declared output shape the graph contradicts) is kept too."""
    out = _python(
        f"""
        import os, sys, warnings
        import numpy as np, onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from graphopt.backends.quiet import collecting, quiet, summarize

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])
        w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        with collecting() as lines:
            with quiet():
                os.write(2, {(TVM_LINE + chr(10))!r}.encode() * 199)
                os.write(2, b"[18:01:02] /src/x.cc:64: Warning: Unknown rule. Checked:\\n  rule_a\\n")
                print("graphopt progress", file=sys.stderr)
                ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                warnings.warn("torch's deprecation", FutureWarning)
                warnings.warn("the user's own warning", UserWarning)
        print(len(lines))
        print(*summarize(lines), sep=chr(10))
        """
    )
    assert out.returncode == 0, out.stderr
    assert "Scope Saving" not in out.stderr and "onnxruntime" not in out.stderr
    assert "deprecation" not in out.stderr and "rule_a" not in out.stderr  # a continued line
    assert "graphopt progress" in out.stderr and "the user's own warning" in out.stderr
    notes = out.stdout.splitlines()
    assert notes[0] == "202"  # 200 TVM lines (one of two lines), ORT's, the FutureWarning
    assert notes[1].startswith('TVM printed 199 warning lines (executable.cc:276), e.g. "Scope')
    assert notes[2].startswith('TVM printed 1 warning line (x.cc:64), e.g. "Unknown rule. Checked:')
    assert 'Checked: rule_a"' in notes[2]
    assert notes[3].startswith("ONNX Runtime printed 1 warning line (graph.cc:")
    assert "Error merging shape info" in notes[3]
    assert notes[4].startswith("a dependency printed 1 FutureWarning line")
    assert len(notes) == 5


def test_tvm_optimize_and_save_print_no_scope_saving():
    """A real TVM compile, measured and saved (save exports the library): stderr has no
    'Scope Saving' line; the report's notes count them, one line per kind (about 10 s)."""
    pytest.importorskip("tvm")
    out = _python(
        """
        import json, sys, tempfile, torch, graphopt
        from torch import nn

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
        r = graphopt.optimize(model, backend="tvm", example_inputs=(torch.randn(1, 3, 8, 8),))
        with tempfile.TemporaryDirectory() as tmp:
            r.save(tmp + "/m.so")
        print(json.dumps(r.report.to_dict()["notes"]))
        print(r.report)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "Scope Saving" not in out.stderr and "FutureWarning" not in out.stderr, out.stderr
    assert out.stderr.strip() == "", out.stderr  # nothing at all: the report has the warnings
    notes = json.loads(out.stdout.splitlines()[0])
    scope = [n for n in notes if "Scope Saving" in n]
    assert scope and all("TVM printed" in n and "executable.cc" in n for n in scope), notes
    assert any(n.startswith("save(): TVM printed") for n in scope)  # the user's save() too
    assert len(notes) <= 4, notes
    assert "note: save(): TVM printed" in out.stdout  # in the text report

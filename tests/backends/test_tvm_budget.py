"""TVM's tuning budget in minutes is kept (issue 18: `--tune-minutes 1` ran 4 minutes).

MetaSchedule reports no measurement during its warm-up round (every task's first batch is sent
before any is joined), so the deadline is kept before each batch is built as well as after each
is measured. The slow test runs the CLI with `--tune-minutes 1` on ResNet-18; the fast ones
check the stop rule and the order the warm-up round spends the budget in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm", reason="the TVM backend needs pip install 'graphopt[tvm]'")

from graphopt.backends.tvm.tuner import heaviest_first, stop_before_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_stop_rule_misses_the_deadline_by_at_most_half_a_batch():
    assert not stop_before_batch(10.0, 60.0, [])  # nothing measured yet: go on
    assert stop_before_batch(60.0, 60.0, [])  # at the deadline: stop
    assert not stop_before_batch(50.0, 60.0, [8.0, 8.0])  # ends at 58: go on
    assert stop_before_batch(57.0, 60.0, [8.0, 8.0])  # would end at 65, 3 s short now: stop
    # one slow batch among fast ones does not stop it (the median of the last five)
    assert not stop_before_batch(50.0, 60.0, [2.0, 2.0, 40.0, 2.0, 2.0])
    assert stop_before_batch(50.0, 60.0, [2.0, 40.0, 40.0, 40.0, 2.0])


def test_warm_up_order_is_heaviest_first():
    """The warm-up round gives tasks their first batch in this order: under a short budget the
    convolutions that dominate the latency come first, not extraction order."""
    from tvm.s_tir import meta_schedule as ms

    from graphopt.backends.tvm.lower import fuse, to_relax, tvm_target
    from graphopt.target import Target

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 64, 3, padding=1), nn.ReLU(), nn.Flatten()
    ).eval()
    target = tvm_target(Target.parse("cpu"))
    fused = fuse(to_relax(model, (torch.randn(1, 3, 32, 32),)), target)
    tasks = [
        t for t in ms.relax_integration.extract_tasks(fused, target) if "conv2d" in t.task_name
    ]
    assert len(tasks) == 2
    # the 3x3 conv, 4 -> 64 channels, has ~200x the FLOPs of the 1x1 conv, 3 -> 4 channels
    big = next(t for t in tasks if "conv2d1" in t.task_name)
    assert heaviest_first(tasks)[0] is big and heaviest_first(tasks[::-1])[0] is big


@pytest.mark.slow
def test_tune_minutes_1_keeps_its_budget(tmp_path):
    """`graphopt optimize resnet18 --backend tvm --tune-minutes 1`: tuning (task extraction,
    starting the builder's and the runner's workers, the warm-up round) takes at most 70 s
    (68 s and 66 s measured here on a shared 2-core VM; 286 s before the budget was kept
    during the warm-up round)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphopt",
            "optimize",
            "resnet18",
            "--backend",
            "tvm",
            "--tune-minutes",
            "1",
            "--no-measure",
            "-q",
            "--database",
            str(tmp_path / "db"),
            "--json",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuning = json.loads(report.read_text())["tvm_tuning"]
    assert tuning["minutes_requested"] == 1.0 and not tuning["reused"]
    # how many trials fit depends on the machine (none on a 2-core VM under load 8, where
    # starting MetaSchedule's runner alone took 30 s); the budget holds either way
    assert tuning["seconds"] <= 70.0, tuning["summary"]

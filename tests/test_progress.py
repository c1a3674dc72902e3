"""Progress: phase lines, kept alive by a heartbeat on a terminal, plain lines elsewhere, nothing
when quiet; and the CLI under a pseudo-terminal is never silent for more than 2 s (issue 18)."""

from __future__ import annotations

import io
import os
import select
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from graphopt.core import PassContext
from graphopt.core.progress import Progress, current
from graphopt.core.registry import get_pass
from graphopt.lowering.context import with_progress
from graphopt.pipeline import PassManager, PrintTiming
from graphopt.pipeline.manager import PassRecord

ROOT = Path(__file__).resolve().parents[1]


class Recorder(io.StringIO):
    """A stream that remembers when each write arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.perf_counter(), text))
        return super().write(text)


def _gaps(times: list[float]) -> float:
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def test_heartbeat_redraws_the_phase_during_a_blocking_call():
    out = Recorder()
    say = Progress(True, stream=out, tty=True, heartbeat_s=0.3)
    with say.active():
        say("compiling the model")
        start = time.perf_counter()
        time.sleep(1.6)  # one blocking C call, as ONNX Runtime's or TVM's compile is
        end = time.perf_counter()
    beats = [t for t, text in out.writes if "... compiling the model" in text]
    assert len(beats) >= 3, out.getvalue()
    assert all(text.startswith("\r\x1b[K") for _, text in out.writes if "..." in text)
    assert _gaps([start, *[t for t, _ in out.writes if start < t < end], end]) < 0.8
    assert out.getvalue().endswith("\r\x1b[K")  # the status line is cleared at the end


def test_heartbeat_fires_inside_a_numpy_call_that_releases_the_gil():
    out = Recorder()
    say = Progress(True, stream=out, tty=True, heartbeat_s=0.2)
    a = np.random.default_rng(0).standard_normal((1500, 1500))
    with say.active():
        say("multiplying")
        start = time.perf_counter()
        while time.perf_counter() - start < 1.2:
            a = np.tanh(a @ a.T / 1500)
    beats = [t for t, text in out.writes if "... multiplying" in text]
    assert len(beats) >= 2, out.getvalue()


def test_done_clears_the_status_line_and_stops_the_beats():
    out = Recorder()
    say = Progress(True, stream=out, tty=True, heartbeat_s=0.1)
    with say.active():
        say("saving model.onnx")
        time.sleep(0.4)
        say.done()
        n = len(out.writes)
        time.sleep(0.4)
        assert len(out.writes) == n  # nothing kept alive after done()
    assert out.writes[n - 1][1] == "\r\x1b[K"


def test_no_heartbeat_after_the_block_and_none_outside_it():
    out = Recorder()
    say = Progress(True, stream=out, tty=True, heartbeat_s=0.1)
    say("outside any block: a line and nothing more")
    time.sleep(0.4)
    assert len(out.writes) == 1
    with say.active():
        say("inside")
        time.sleep(0.4)
    n = len(out.writes)
    time.sleep(0.4)
    assert len(out.writes) == n
    assert not [t for t in threading.enumerate() if t.name == "graphopt-progress"]


def test_not_a_terminal_plain_lines_at_a_lower_rate():
    out = Recorder()
    say = Progress(True, stream=out, tty=False, heartbeat_s=0.05, plain_every_s=0.4)
    with say.active():
        say("measuring latency")
        time.sleep(1.0)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].endswith("] measuring latency")
    still = [line for line in lines if "... measuring latency" in line]
    assert 1 <= len(still) <= 3, text  # every 0.4 s, not every 0.05 s


def test_phase_with_a_total_gives_counts_and_an_estimate():
    out = Recorder()
    say = Progress(True, stream=out, tty=False, plain_every_s=0.2)
    with say.active():
        for _ in say.track(range(4), "bias correction", unit="layer"):
            time.sleep(0.15)
    text = out.getvalue()
    assert "bias correction: 1/4 layer (25%)" in text or "bias correction: 2/4 layer" in text
    assert "left" in text  # the estimate from the rate so far
    assert "bias correction: 4/4 layer (100%)" in text  # the closing line of a long phase


def test_phase_with_a_total_on_a_terminal_is_a_tqdm_bar():
    out = Recorder()
    say = Progress(True, stream=out, tty=True)
    with say.active(), say.phase("tuning", 3, unit="trial", leave=True) as bar:
        for _ in range(3):
            bar.update()
            bar.note("est 1.25 ms")
    text = out.getvalue()
    assert "tuning" in text and "3/3" in text and "trial/s" in text


def test_a_phase_inside_a_bar_is_shown_in_the_bar_not_over_it():
    out = Recorder()
    say = Progress(True, stream=out, tty=True, heartbeat_s=0.2)
    with say.active(), say.phase("stretches", 2, unit="stretch") as bar:
        bar.note("layer1")
        with say.phase("timing 3 units", estimate_s=20):
            time.sleep(0.7)
        bar.update()
    text = out.getvalue()
    assert "stretches:" in text and "layer1; timing 3 units" in text and "left" in text
    assert "\r\x1b[K[" not in text  # no status line drawn over the bar


def test_quiet_prints_nothing_and_starts_no_thread():
    out = Recorder()
    say = Progress(False, stream=out, tty=True, heartbeat_s=0.05)
    with say.active():
        assert current() is say
        say("a phase")
        say.line("a line")
        with say.phase("a bar", 3) as bar:
            bar.update(3)
        list(say.track([1, 2], "tracked"))
        assert not [t for t in threading.enumerate() if t.name == "graphopt-progress"]
        time.sleep(0.2)
    assert out.getvalue() == ""


class _Job:
    def __init__(self, progress: bool) -> None:
        self.progress = progress

    @with_progress
    def run(self) -> Progress:
        return current()


def test_optimize_shows_progress_through_a_callers_progress_or_its_own():
    say = Progress(True, stream=io.StringIO(), tty=False)
    with say.active():
        assert _Job(True).run() is say  # one Progress for a whole command, not two
        assert not _Job(False).run().enabled  # progress=False stays quiet inside
    own = _Job(True).run()
    assert own is not say and own.enabled


def test_current_is_disabled_outside_active():
    assert not current().enabled
    say = Progress(True, stream=io.StringIO(), tty=False)
    with say.active():
        assert current() is say
    assert not current().enabled


def test_print_timing_numbers_the_int8_stage_as_the_report_does_with_its_state_word():
    """The ONNX stage's passes run under their own manager (positions from 0): the line says
    [3] for the first of them after two FX passes, as the report's table does, and the word
    is the record's (insert-qdq said 'unchanged' where the table said changed)."""
    out = Recorder()
    say = Progress(True, stream=out, tty=False)
    timing = PrintTiming(total=2, progress=say)
    fold, qdq = get_pass("fold-conv-bn")(), get_pass("insert-qdq")()
    for position in (0, 1):
        record = PassRecord(position, fold.name, str(fold), "exact", time_s=0.01)
        timing.before_pass(position, fold, None, None)
        timing.after_pass(position, fold, None, None, record)
    record = PassRecord(0, qdq.name, str(qdq), "lossy", modified=True, time_s=0.5)
    timing.before_pass(0, qdq, None, None)
    timing.after_pass(0, qdq, None, None, record)
    lines = out.getvalue().splitlines()
    assert "[1/2] fold-conv-bn" in lines[0] and "unchanged" in lines[0]
    assert "[3] insert-qdq" in lines[2] and "modified" in lines[2] and "unchanged" not in lines[2]
    record.status = "rolled-back"
    timing.after_pass(0, qdq, None, None, record)
    assert "rolled-back" in out.getvalue().splitlines()[-1]


def test_pass_manager_with_print_timing_under_progress(tmp_path):
    import torch
    from torch import fx, nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gm = fx.symbolic_trace(model)
    out = Recorder()
    say = Progress(True, stream=out, tty=False)
    manager = PassManager(
        "fold-conv-bn,eliminate-dead-code", instruments=[PrintTiming(total=2, progress=say)]
    )
    with say.active():
        manager.run(gm, PassContext(sample_inputs=(torch.randn(1, 3, 8, 8),)))
    lines = out.getvalue().splitlines()
    assert "[1/2] fold-conv-bn" in lines[0] and "modified" in lines[0]
    assert "[2/2] eliminate-dead-code" in lines[1]


# ------------------------------------------------------------------------------------------------
# the CLI under a pseudo-terminal


def _run_in_pty(args: list[str], timeout: float) -> tuple[int, list[tuple[float, str]]]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; returns the exit status and
    each chunk of output with its arrival time, the first chunk being ``(start, "")``."""
    master, slave = os.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=env
    )
    os.close(slave)
    chunks: list[tuple[float, str]] = [(time.monotonic(), "")]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append((time.monotonic(), data.decode(errors="replace")))
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, chunks


_HOLD_THE_GIL = """
import re, sys, time
from graphopt.launch import _Ticker
ticker = _Ticker(time.perf_counter())
ticker.start()
start = time.perf_counter()
re.match(r"(a+)+$", "a" * 25 + "b")  # one C call that never lets go of the GIL, as loading
held = time.perf_counter() - start  # torch's extension modules does for seconds
ticker.stop()
print(f"held {held:.2f}")
"""


def test_the_loading_line_goes_on_while_the_import_holds_the_gil():
    """A thread of the importing process cannot write while the import holds the GIL (CI saw
    a 2.3 s silence while torch loaded): the ticker is a child process, and its line is
    redrawn every second through a C call that holds the GIL for seconds."""
    code, chunks = _run_in_pty([sys.executable, "-c", _HOLD_THE_GIL], timeout=120)
    text = "".join(c for _, c in chunks)
    assert code == 0, text
    held = float(text.rsplit("held ", 1)[1].split()[0])
    assert held > 1.5, text  # the regex took long enough to show a silence
    lines = [t for t, c in chunks if "loading graphopt" in c]
    assert len(lines) >= int(held) - 1, text
    assert _gaps(lines) <= 1.5, [round(b - a, 2) for a, b in zip(lines, lines[1:], strict=False)]
    assert text.rstrip().endswith(f"held {held:.2f}")
    assert "\r\x1b[K" in text.split("held")[0][-10:]  # the last line cleared before the print


def test_the_command_runs_with_stderr_closed(tmp_path):
    """Started with ``2>&-`` (sys.stderr is None), the command neither shows its loading line
    nor crashes writing progress: the report comes out on stdout, and the exit status says."""
    command = (
        f"{shlex.quote(sys.executable)} -m graphopt optimize digits_cnn --pipeline fold-conv-bn "
        f"--no-measure -o {shlex.quote(str(tmp_path / 'm.onnx'))} 2>&-"
    )
    out = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=240
    )
    assert out.returncode == 0, out.stdout[-2000:]
    assert out.stdout.startswith("graphopt report: digits_cnn") and out.stderr == ""
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_cli_on_a_terminal_is_never_silent_for_two_seconds(tmp_path):
    """resnet18's capture check, passes and ONNX Runtime lowering each take seconds here: the
    heartbeat keeps every one of them visible, and from the start: graphopt.launch says it is
    loading while torch and ONNX Runtime import."""
    code, chunks = _run_in_pty(
        [
            sys.executable,
            "-m",
            "graphopt",
            "optimize",
            "resnet18",
            "--pipeline",
            "fold-conv-bn",
            "--no-measure",
            "-o",
            str(tmp_path / "m.onnx"),
        ],
        timeout=240,
    )
    text = "".join(c for _, c in chunks)
    assert code == 0, text[-3000:]
    times = [t for t, _ in chunks]
    silences = [
        (round(b - a, 1), text[:80])
        for (a, _), (b, text) in zip(chunks, chunks[1:], strict=False)
        if b - a > 2
    ]
    assert _gaps(times) <= 2.0, silences
    assert "[1/1] fold-conv-bn" in text and "modified" in text
    assert "loading graphopt (torch, ONNX Runtime)" in text
    assert "\r\x1b[K[" in text  # status lines drawn (the heartbeat itself: tests above)
    assert "saving " in text and "graphopt report: resnet18" in text

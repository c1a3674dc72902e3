"""The HTML report (``report.save("report.html")``, ``--report``): escaping, odd values, which
plots appear, and the pages of real runs rendered in headless Chromium (Debian's ``chromium``
package) without console errors, with their plots laid out and their tables.

The browser test is skipped, with the reason, where Chromium is not installed. The reports come
from real runs on tiny models (int8 with a ``max_drop`` budget; merge-convs and
substitute-monarch, timed on ONNX Runtime): about 15 s, Chromium about 5 s.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.measure import Latency
from graphopt.cli import main
from graphopt.core.numerics import Comparison
from graphopt.errors import InputError
from graphopt.passes.merge_convs.candidates import Candidate, StretchPlan
from graphopt.passes.merge_convs.depth import DepthPlan
from graphopt.passes.substitute_monarch.plan import Candidate as MonarchCandidate
from graphopt.passes.substitute_monarch.plan import LayerPlan
from graphopt.pipeline import PassRecord
from graphopt.report import Report, html
from graphopt.report.svg import fmt, ticks
from graphopt.testing import seeded

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found: apt-get install chromium"
)

# every element the page may hold; an escaped string never adds one
TAGS = {
    "html", "head", "meta", "title", "style", "script", "body", "h1", "h2", "h3", "section",
    "table", "thead", "tbody", "tr", "th", "td", "div", "details", "summary", "pre", "p", "code",
    "ul", "li", "span", "figure", "figcaption", "svg", "rect", "text", "line", "path", "circle",
    "footer", "wbr", "b",
}  # fmt: skip


class Page(HTMLParser):
    """What a test reads from a page: its tags, the ``<html>`` attributes, the tables by id,
    and each plot's marks (bars and points) by the plot's id."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.root: dict[str, str] = {}
        self.tables: set[str] = set()
        self.marks: dict[str, int] = {}
        self.texts: dict[str, list[str]] = {}
        self._plot: str | None = None
        self.feed(source)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "html":
            self.root = a
        elif tag == "table":
            self.tables.add(a.get("id", ""))
        elif tag == "figure" and "plot" in a.get("class", ""):
            self._plot = a["id"].removeprefix("plot-")
            self.marks[self._plot] = 0
            self.texts[self._plot] = []
        elif self._plot and "mark" in a.get("class", "").split():
            self.marks[self._plot] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._plot = None

    def handle_data(self, data: str) -> None:
        if self._plot and data.strip():
            self.texts[self._plot].append(data.strip())


def _report(**fields) -> Report:
    base = dict(model="m", target="cpu", backend="onnxruntime", backend_version="1", pipeline="p",
                capture_method="symbolic_trace")  # fmt: skip
    return Report(**{**base, **fields})


# ------------------------------------------------------------------------------------------------
# without a browser


def test_every_string_is_escaped():
    """Strings from the model, a pass, its decisions, int8 layers and notes never become
    markup: the page holds only its own elements and its own two scripts."""
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>&'
    record = PassRecord(
        0, "merge-convs", f"merge-convs{{note={evil}}}", "exact", status="rolled-back",
        message=evil, decisions=[evil, StretchPlan(evil, (evil, "b"), (1, 2), chosen=[
            Candidate(0, 2, latency_ms=1.0)], candidates=[Candidate(0, 1, latency_ms=2.0),
            Candidate(1, 2, latency_ms=2.0), Candidate(0, 2, latency_ms=1.0)],
            predicted_ms=1.0, unmerged_ms=4.0)],
        comparison=Comparison(False, "max_abs", 1.0, 0.1, evil),
    )  # fmt: skip
    report = _report(
        model=evil, records=[record], warnings=[evil], notes=[evil], capture_notes=[evil],
        latency_baseline=Latency(2.0, 1.5, 2.5, 9), latency_optimized=Latency(1.0, 0.9, 1.1, 9),
        baseline_name=evil, backend_latencies={evil: Latency(1.0, 0.9, 1.1, 9)},
        quantization={"metric": evil, "layers": [{"layer": evil, "quantized": False,
                      "reason": evil}], "sensitivity": [{"layer": evil, "drop_without": 0.1}]},
    )  # fmt: skip
    page = html.render(report.to_dict())
    parsed = Page(page)
    assert parsed.tags <= TAGS, parsed.tags - TAGS
    assert page.count("<script>") == 2 and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert parsed.marks["merge-convs"] == 2 and parsed.marks["int8-sensitivity"] == 1
    assert parsed.marks["backends"] == 1 and parsed.marks["latency"] == 2


def test_missing_nan_and_negative_latencies_print_as_na():
    """A NaN baseline draws no bar and gives no speedup; an infinite p90 draws no whisker; a
    negative backend latency is not a measurement; NaN pass times are n/a. The same page
    comes from the dict and from the strict JSON read back."""
    nan = float("nan")
    report = _report(
        records=[PassRecord(0, "fold-conv-bn", "fold-conv-bn", "exact", time_s=nan)],
        latency_baseline=Latency(nan, nan, nan, 0),
        latency_optimized=Latency(1.0, 0.9, math.inf, 5),
        backend_latencies={"tvm": Latency(-1.0, -1.0, -1.0, 3), "onnxruntime": None},
    )
    for data in (report.to_dict(), json.loads(report.to_json())):
        page = html.render(data)
        parsed = Page(page)
        assert parsed.marks["latency"] == 1  # graphopt's bar; the baseline says n/a
        assert "before: n/a" in parsed.texts["latency"]
        assert 'class="whisker"' not in page.split('id="plot-latency"')[1].split("</figure>")[0]
        assert parsed.marks["backends"] == 0 and parsed.marks["pass-time"] == 0
        assert "no speedup" in page and "n/a" in page
        assert not re.search(r"\b(nan|inf|infinity)\b", page, re.IGNORECASE)


def test_plots_appear_only_with_their_data():
    empty = Page(html.render(_report().to_dict()))
    assert empty.marks == {} and "summary" in empty.tables and "passes" in empty.tables
    layer = LayerPlan("fc", "Linear", 512, 512, (8, 512), 262144, dense_ms=0.09, candidates=[
        MonarchCandidate("monarch(b=4,r=32)", "monarch", 65536, 0.05, 0.01, 0.03),
        MonarchCandidate("low-rank(r=8)", "low-rank", 8192, 0.5, 0.2, None)])  # fmt: skip
    layer.chosen = layer.candidates[0]
    record = PassRecord(0, "substitute-monarch", "substitute-monarch{max_error=0.1}", "lossy",
                        modified=True, time_s=1.0, decisions=[layer])  # fmt: skip
    page = html.render(_report(records=[record]).to_dict())
    parsed = Page(page)
    assert set(parsed.marks) == {"pass-time", "monarch"} and parsed.marks["monarch"] == 1
    assert "1 candidates not timed" in page and "max_error 0.1" in page
    assert {"monarch-layers", "decisions-0"} <= parsed.tables


def test_per_layer_plots_of_a_deep_model_show_the_worst_layers_and_say_so():
    """ResNet-50 has 54 int8 layers: the plots show the 30 most sensitive and the 30 largest
    bias shifts; the layer table lists all."""
    names = [f"layer{i}.conv" for i in range(54)]
    q = {
        "metric": "top-1", "drop_all_int8": 0.05,
        "layers": [{"layer": n, "quantized": True} for n in names],
        "sensitivity": [{"layer": n, "drop_without": 0.05 - i * 1e-4} for i, n in enumerate(names)],
        "bias_correction": [{"layer": n, "mean_abs_shift": i, "max_abs_shift": 2 * i}
                            for i, n in enumerate(names)],
    }  # fmt: skip
    page = html.render(_report(quantization=q).to_dict())
    parsed = Page(page)
    assert parsed.marks["int8-sensitivity"] == 30 and parsed.marks["int8-bias"] == 60
    assert "layer53.conv" in parsed.texts["int8-sensitivity"]  # the most sensitive is shown
    assert "layer0.conv" not in parsed.texts["int8-bias"]  # the smallest shift is not
    assert page.count("Shown: the 30") == 2 and page.count("<td>layer0.conv</td>") == 1


def test_backends_ort_settings_and_tvm_tasks():
    """backend="auto": each candidate backend, the ORT settings tried (the chosen one
    marked) and TVM's tasks with the untuned ones counted."""
    report = _report(
        backend="tvm", backend_choice="tvm: the lowest median in the same run (1.000 ms)",
        backend_latencies={"onnxruntime": Latency(2.0, 1.9, 2.2, 9),
                           "tvm": Latency(1.0, 0.9, 1.1, 9)},
        ort_settings={"label": "2 threads"},
        ort_settings_latencies={"1 thread": Latency(3.0, 2.9, 3.1, 9),
                                "2 threads": Latency(2.0, 1.9, 2.1, 9)},
        tvm_tasks=[{"name": "conv2d_0", "status": "tuned"}, {"name": "dense_1"}],
        tvm_tuning={"summary": "64 trials in 1.0 min"},
    )  # fmt: skip
    page = html.render(report.to_dict())
    parsed = Page(page)
    assert parsed.marks["backends"] == 2 and parsed.marks["ort-settings"] == 2
    assert "tvm (chosen)" in parsed.texts["backends"]  # named first in backend_choice
    assert "onnxruntime (chosen)" not in parsed.texts["backends"]
    assert "2 threads (chosen)" in parsed.texts["ort-settings"]
    assert "tvm-tasks" in parsed.tables and "2 TVM tasks, 1 untuned" in page
    assert "64 trials in 1.0 min" in page


def test_merge_convs_depth_plan_is_plotted_and_tabled():
    plan = DepthPlan(budget_ms=1.0, unmerged_ms=2.0, predicted_ms=0.9, measured_before_ms=3.0,
                     measured_after_ms=1.5, removed=["relu1"], kept=["relu2"],
                     spans=["c1..c2 merged"])  # fmt: skip
    record = PassRecord(0, "merge-convs", "merge-convs{budget=0.5}", "lossy", modified=True,
                        time_s=2.0, decisions=[plan])  # fmt: skip
    page = html.render(_report(records=[record]).to_dict())
    parsed = Page(page)
    assert parsed.marks["merge-convs"] == 5  # alone / planned / budget; model before / after
    assert "merge-convs-depth" in parsed.tables and "c1..c2 merged" in page


def test_save_writes_html_or_json_and_refuses_other_suffixes(tmp_path):
    report = _report(latency_optimized=Latency(1.0, 0.9, 1.1, 5),
                     latency_baseline=Latency(1.2, 1.0, 1.4, 5), baseline_name="ort")  # fmt: skip
    assert report.save(tmp_path / "r.json").read_text() == report.to_json()
    page = report.save(tmp_path / "R.HTML").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="plot-latency"' in page
    assert "<b>1.20x</b> faster than ort" in page and "within the noise" in page
    report.latency_baseline = Latency(1.5, 1.2, 1.8, 5)  # ranges apart: no such remark
    assert "within the noise" not in html.render(report.to_dict())
    with pytest.raises(InputError, match=r"\.html or \.json"):
        report.save(tmp_path / "r.txt")
    with pytest.raises(InputError, match="cannot write"):
        report.save(tmp_path / "missing" / "r.html")


def test_cli_refuses_a_report_name_it_cannot_write_before_building_the_model(tmp_path, capsys):
    assert main(["optimize", "mobileone_s0", "--report", str(tmp_path / "r.txt")]) == 2
    assert "--report" in capsys.readouterr().err


def test_cli_writes_the_page(tmp_path, capsys):
    (tmp_path / "tiny.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n"
        "    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()\n"
        "    return net, (torch.randn(1, 3, 8, 8),)\n"
    )
    page, saved = tmp_path / "tiny.html", tmp_path / "tiny.json"
    argv = ["optimize", f"{tmp_path / 'tiny.py'}:build", "--no-measure", "--quiet", "--report",
            str(page), "--json", str(saved)]  # fmt: skip
    assert main(argv) == 0
    assert f"HTML report written to {page}" in capsys.readouterr().out
    # `graphopt report` makes the same page from the saved JSON
    assert main(["report", str(saved), "-o", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == page.read_text()
    page.with_name("broken.json").write_text("{not json")
    assert main(["report", str(page.with_name("broken.json"))]) == 2
    assert "broken.json is not JSON" in capsys.readouterr().err
    assert main(["report", str(saved), "-o", str(saved)]) == 2  # never over the JSON itself
    parsed = Page(page.read_text())
    assert parsed.marks["pass-time"] == 5 and "latency" not in parsed.marks
    assert parsed.marks["ops"] == 2  # BatchNorm2d folded away: 1 before, 0 after
    assert {"summary", "passes"} <= parsed.tables


def test_axis_ticks_and_numbers():
    assert ticks(0.0, 16.9) == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert ticks(0.0, 0.0)[-1] > 0  # one value still gives an axis
    assert (fmt(26385.6), fmt(0.000123456), fmt(float("nan")), fmt(None)) == (
        "26386", "0.0001235", "n/a", "n/a",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# real runs, rendered in Chromium


class _Mlp(nn.Module):
    """A feature 400x larger than the others: every layer int8 loses accuracy (from
    tests/test_int8_api.py), so the max_drop search measures each layer's sensitivity."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _ConvsThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(8, 64, 1), nn.Conv2d(64, 8, 1), nn.Linear(8, 256)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def reports() -> dict[str, Report]:
    gen = seeded(3)
    mlp = _Mlp().eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        mlp.fc1.weight[:, 0] *= 1e-3
    scale = torch.ones(16)
    scale[0] = 400.0
    calib = [(torch.randn(32, 16, generator=gen) * scale,) for _ in range(4)]
    int8 = graphopt.optimize(mlp, "cpu", (calib[0][0][:1],), calibration_data=calib,
                             precision="int8", max_drop=0.02)  # fmt: skip
    torch.manual_seed(0)
    lossy = graphopt.optimize(
        _ConvsThenLinear().eval(), "cpu", (torch.randn(4, 8, 16, 16),),
        pipeline="merge-convs{runs=5},substitute-monarch{nblocks=4,min_features=0,"
        "max_error=10.0,output_cosine=0,block_diagonal=false,runs=5}",
    )  # fmt: skip
    return {"int8": int8.report, "lossy": lossy.report}


def _browse(pages: dict[str, Path]) -> dict[str, tuple[str, list[str]]]:
    """Each page's DOM after its scripts ran and the console lines Chromium logged for it, the
    pages loaded side by side (one headless Chromium each, its own profile)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {
            name: subprocess.Popen(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    f"--user-data-dir={tmp}/{name}",
                    "--enable-logging=stderr",
                    "--v=0",
                    "--dump-dom",
                    page.as_uri(),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for name, page in pages.items()
        }
        out = {}
        for name, proc in procs.items():
            dom, log = proc.communicate(timeout=120)
            out[name] = (dom, [line for line in log.splitlines() if ":CONSOLE" in line])
    return out


@needs_chromium
def test_pages_render_in_chromium_without_errors_with_their_plots(reports, tmp_path):
    pages = {name: report.save(tmp_path / f"{name}.html") for name, report in reports.items()}
    # the control: the same page with a script error and a fetch the page's policy blocks
    broken = (
        pages["int8"]
        .read_text()
        .replace(
            "</body>", '<img src="http://example.invalid/x.png"><script>missing()</script></body>'
        )
    )
    pages["control"] = tmp_path / "control.html"
    pages["control"].write_text(broken)
    seen = _browse(pages)

    dom, console = seen["control"]
    assert "missing is not defined" in Page(dom).root.get("data-js-errors", "")
    assert any("Content Security Policy" in line for line in console), console
    expected = {
        "int8": ({"int8-sensitivity": 2, "int8-bias": 4},
                 {"summary", "passes", "int8-metric", "int8-layers"}),
        "lossy": ({"merge-convs": 2, "ops": 2},
                  {"summary", "passes", "merge-convs-stretches", "monarch-layers"}),
    }  # fmt: skip
    for name, (plots, tables) in expected.items():
        dom, console = seen[name]
        page = Page(dom)
        assert console == [], (name, console)
        assert "data-js-errors" not in page.root, (name, page.root)
        drawn, total = page.root["data-rendered"].split("/")
        assert drawn == total and int(total) == sum(page.marks.values()), (name, page.root)
        for plot, marks in plots.items():
            assert page.marks.get(plot) == marks, (name, plot, page.marks)
        assert page.marks["pass-time"] == len(reports[name].records) > 0
        # before, after each pass that changed the model (int8: the float one too), after
        assert page.marks["latency"] == 2 + len(reports[name].pass_latencies), name
        assert tables <= page.tables, (name, page.tables)
    # int8 times the float model after the FX passes too, where one changed the graph's
    # structure: here the only one that changed it, equalize-layers, rescaled weights only
    int8_stage = ("smooth-quant", "correct-bias", "insert-qdq", "fallback-to-float")
    changed = [r.name for r in reports["int8"].records if r.modified and r.name not in int8_stage]
    assert changed == ["equalize-layers"] and reports["int8"].pass_latencies == {}
    assert page.marks["monarch"] >= 2  # the Linear's two candidates, both timed

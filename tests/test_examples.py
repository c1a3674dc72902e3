"""The README's example pass and examples/custom_pass.py (they fire on the graphs users write),
the README's contents (every link resolves, every section listed) and optimize()'s signature."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import graphopt

ROOT = Path(__file__).resolve().parents[1]

# what a user writes: -(-x) traces to operator.neg, x.neg() to a method, torch.neg to itself
_CHECK = """
import torch
from torch import nn
from graphopt.testing import run_pass

class Model(nn.Module):
    def forward(self, x):
        return torch.relu(-(-x)) + torch.neg(x.neg()) - (-x)

x = torch.randn(2, 8)
graph, result = run_pass("drop-double-neg", Model(), (x,))
negs = sum(is_neg(n) for n in graph.graph.nodes)
print("result", result.modified, dict(result.stats), negs)
assert torch.equal(graph(x), Model()(x))
"""


def _readme_pass() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Writing and testing your own pass") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_readme_pass_fires_on_unary_minus():
    out = _run(_readme_pass() + _CHECK)
    assert out.returncode == 0, out.stderr
    # two double negations removed; the single -x of the last term stays
    assert "result True {'removed': 2} 1" in out.stdout, out.stdout


def test_custom_pass_example_changes_the_graph():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_pass.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "('drop-double-neg', 'ok', {'removed': 1})" in out.stdout
    assert "neg nodes: 2 -> 0" in out.stdout


def _readme_headings() -> list[tuple[int, str]]:
    """(level, text) of every heading outside code blocks."""
    headings, fenced = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.*)", line)):
            headings.append((len(m.group(1)), m.group(2).strip()))
    return headings


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_readme_contents_links_every_section_and_every_anchor_resolves():
    readme = (ROOT / "README.md").read_text()
    contents = readme[readme.index("**Contents**") : readme.index("graphopt makes a trained")]
    anchors = {_github_anchor(text) for _, text in _readme_headings()}
    listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
    sections = {_github_anchor(text) for level, text in _readme_headings() if level == 2}
    assert sections - listed == set(), "sections missing from the README's contents"
    assert set(re.findall(r"\]\(#([^)]+)\)", readme)) - anchors == set(), "dangling links"
    license_text = (ROOT / "LICENSE").read_text()
    assert "(LICENSE)" in contents and license_text.split()[:5] == [
        "Apache",
        "License",
        "Version",
        "2.0,",
        "January",
    ]
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a pointer


def test_readme_signature_is_optimize_s_whole_signature():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The whole signature of `graphopt.optimize`") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = [ln.strip() for ln in block.splitlines()[1:-1] if ln.strip() != "*,"]
    names = [ln.split("=")[0].split(",")[0] for ln in lines]
    assert names == list(inspect.signature(graphopt.optimize).parameters)
    for ln in lines:  # each with its meaning, and its default as in the code
        assert "  # " in ln, ln
        name, _, default = ln.split("  #")[0].strip().rstrip(",").partition("=")
        param = inspect.signature(graphopt.optimize).parameters[name.strip()]
        if default:
            assert eval(default) == param.default, name  # noqa: S307 (the README's own text)

"""The README's example pass and examples/custom_pass.py: they fire on the graphs users write."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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

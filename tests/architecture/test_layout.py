"""The house rules of the package's layout, checked on every run (README "Layout").

- the import direction of pyproject.toml's import-linter contracts (layers, passes import only
  core/fx/algebra/nn/backends.measure, no pass imports another);
- no module over 600 lines, no function over 80 unless a comment right above it says why
  (``# over 80 lines: <why>``);
- graphopt's own modules are imported at module level (a function-level import hides a cycle);
  only heavy optional packages are imported inside functions;
- no private name (``_x``) imported from another graphopt module.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "graphopt"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_REASON = "# over 80 lines:"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: install the dev extra, pip install -e '.[dev]'")
    return subprocess.run(
        [exe, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_import_contracts_catch_an_upward_import(tmp_path):
    """The contracts are not vacuous: a backend that imports the report (an upward import)
    breaks the layers contract."""
    copy = tmp_path / "graphopt"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    measure = copy / "backends" / "measure.py"
    measure.write_text(measure.read_text() + "\nimport graphopt.report  # upward\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "graphopt.backends.measure -> graphopt.report" in result.stdout


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_functions_are_small(path):
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{len(lines)} lines: split the module"
    long = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        size = node.end_lineno - node.lineno + 1
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if size > MAX_FUNCTION_LINES and LONG_REASON not in lines[first - 2]:
            long.append(f"{node.name} (line {node.lineno}): {size} lines")
    assert not long, "functions over 80 lines without a reason: " + "; ".join(long)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_graphopt_modules_are_imported_at_module_level(path):
    tree = ast.parse(path.read_text())
    inside = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            module = getattr(node, "module", None) if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if (module or "").startswith("graphopt") or any(
                n.startswith("graphopt") for n in names
            ):
                inside.append(f"line {node.lineno} in {func.name}")
    assert not inside, "graphopt imported inside a function: " + ", ".join(inside)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_imported_from_another_module(path):
    tree = ast.parse(path.read_text())
    private = [
        f"{node.module}.{a.name} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("graphopt")
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not private, "private names imported across modules: " + ", ".join(private)

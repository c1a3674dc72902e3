"""ONNX's backend node tests of every op graphopt imports, through import and through optimize().

Runs the cases tests/conformance/test_onnx_node.py runs (ONNX's own generators,
``onnx.backend.test.case.node``; single-node cases of the ops in
``graphopt.frontends.onnx.SUPPORTED_OPS``), judged the same way, and writes the per-op table to
benchmarks/results/onnx_node_tests.md (failures listed case by case).

    .venv/bin/python benchmarks/conformance_onnx_node.py            # both paths (~4 min)
    .venv/bin/python benchmarks/conformance_onnx_node.py --import-only
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "conformance"))

from test_onnx_node import Outcome, node_cases, run_case  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _reason(detail: str) -> str:
    """A refusal's reason without the node's name and the advice: what is not supported."""
    text = re.sub(r"^ONNX node '[^']*' \((\w+)\): ", "", detail)
    text = re.sub(
        r"^ONNX graph input '[^']*' \(read by [^)]*\) has element type (\w+).*",
        r"a graph input of type \1 (no torch dtype)",
        text,
    )
    text = re.sub(r"'[^']*_\d+'", "'…'", text)
    return text.split(". ")[0].strip().rstrip(".")[:110]


def _summary(outcomes: list[Outcome]) -> str:
    reasons = Counter(_reason(o.detail) for o in outcomes if o.status == "refused")
    return "; ".join(f"{r} ({n})" if n > 1 else r for r, n in reasons.most_common())


def _table(by_op: dict[str, dict[str, list[Outcome]]], paths: list[str]) -> list[str]:
    head = "| op | tests | " + " | ".join(f"{p}: pass / refused / fail" for p in paths)
    lines = [head + " | refusals (import) |", "|---|---:|" + "---:|" * len(paths) + "---|"]
    for op, per_path in sorted(by_op.items()):
        first = per_path[paths[0]]
        cells = []
        for p in paths:
            c = Counter(o.status for o in per_path[p])
            cells.append(f"{c['pass']} / {c['refused']} / {c['fail']}")
        lines.append(f"| {op} | {len(first)} | " + " | ".join(cells) + f" | {_summary(first)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--import-only", action="store_true", help="skip the optimize() path")
    args = parser.parse_args()
    paths = ["import"] if args.import_only else ["import", "optimize"]
    cases = node_cases()
    by_op: dict[str, dict[str, list[Outcome]]] = defaultdict(dict)
    seconds: dict[str, float] = {}
    for path in paths:
        start = time.perf_counter()
        for op, op_cases in cases.items():
            by_op[op][path] = [run_case(case, path) for case in op_cases]
            done = Counter(o.status for o in by_op[op][path])
            print(f"{path:<8} {op:<20} {dict(done)}", flush=True)
        seconds[path] = time.perf_counter() - start
    totals = {p: Counter(o.status for ops in by_op.values() for o in ops[p]) for p in paths}
    n = sum(len(v) for v in cases.values())
    lines = [
        "# ONNX backend node tests",
        "",
        f"ONNX's own node test cases (onnx {onnx.__version__}, `onnx.backend.test.case.node`), "
        f"every single-node case of the {len(cases)} ops in graphopt's converter table: {n} "
        "cases. Each runs through `import_onnx` (the GraphModule called on the inputs) and "
        "through `optimize(model, example_inputs=inputs, measure=False)` (the artifact run), "
        "compared as ONNX's backend runner compares (shape, dtype, rtol 1e-3 / atol 1e-7). "
        "*refused*: a GraphoptError naming the op (or a node the converter refused, kept opaque "
        "and run by ONNX Runtime; or optimize() refusing NaN/inf/empty example inputs); *fail*: "
        "a wrong output, a raw exception, an internal error or a verification mismatch.",
        "",
        "Produced by `.venv/bin/python benchmarks/conformance_onnx_node.py`.",
        "",
    ]
    for p in paths:
        t = totals[p]
        lines.append(
            f"- **{p}**: {t['pass']} pass, {t['refused']} refused, {t['fail']} fail "
            f"({seconds[p]:.0f} s)"
        )
    lines += ["", *_table(by_op, paths), ""]
    failures = [o for ops in by_op.values() for p in paths for o in ops[p] if o.status == "fail"]
    if failures:
        lines += ["## Failures", ""]
        for p in paths:
            for op in sorted(by_op):
                for o in by_op[op][p]:
                    if o.status == "fail":
                        detail = o.detail.splitlines()[0][:200].replace("|", "/")
                        lines.append(f"- {p} `{o.case}`: {detail}")
        lines.append("")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx_node_tests.md").write_text("\n".join(lines))
    print("\n".join(line for line in lines if line.startswith("- **")))


if __name__ == "__main__":
    main()

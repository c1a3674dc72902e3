"""Write a pass in one file, test it with graphopt.testing, run it in a pipeline string.

Run: python examples/custom_pass.py
"""

import operator
from collections import Counter

import torch
from torch import fx, nn

from graphopt import Numerics, Pass, PassContext, PassManager, PassResult, capture, register_pass
from graphopt.testing import assert_pass_preserves, verify_rewrite

# -x traces to operator.neg, torch.neg(x) to torch.neg, x.neg() to the method "neg"
NEG = (operator.neg, torch.neg, "neg")


def is_neg(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op != "call_module" and node.target in NEG


@register_pass
class DropDoubleNeg(Pass):
    """drop-double-neg: -(-x) -> x"""

    name = "drop-double-neg"
    numerics = Numerics.exact()

    def run(self, gm, ctx):
        stats = Counter()
        for node in list(gm.graph.nodes):
            inner = node.args[0] if is_neg(node) else None
            if not is_neg(inner):
                continue
            if len(inner.users) != 1:  # -x is read elsewhere too: keep it
                stats["skipped:shared"] += 1
                continue
            node.replace_all_uses_with(inner.args[0])
            gm.graph.erase_node(node)
            gm.graph.erase_node(inner)
            stats["removed"] += 1
        gm.recompile()
        return PassResult(gm, modified=stats["removed"] > 0, stats=stats)


class Before(nn.Module):
    def forward(self, x):
        return torch.relu(-(-x))  # noqa: B002 (traces to operator.neg twice)


class Expected(nn.Module):
    def forward(self, x):
        return torch.relu(x)


if __name__ == "__main__":
    x = torch.randn(2, 8)
    verify_rewrite("drop-double-neg", Before(), Expected(), (x,))
    assert_pass_preserves("drop-double-neg", Before(), (x,), expect_modified=True)
    graph = capture(Before(), (x,)).graph
    negs_before = sum(map(is_neg, graph.graph.nodes))
    result = PassManager("drop-double-neg,eliminate-dead-code").run(
        graph, PassContext(sample_inputs=(x,))
    )
    print([(r.spec, r.status, r.stats) for r in result.records])
    print(f"neg nodes: {negs_before} -> {sum(map(is_neg, result.graph.graph.nodes))}")

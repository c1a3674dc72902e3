"""Write a pass in one file, test it with graphopt.testing, run it in a pipeline string.

Run: python examples/custom_pass.py
"""

from collections import Counter

import torch
from torch import nn

from graphopt import Numerics, Pass, PassContext, PassManager, PassResult, capture, register_pass
from graphopt.testing import assert_pass_preserves, verify_rewrite


@register_pass
class DropDoubleNeg(Pass):
    """drop-double-neg: -(-x) -> x"""

    name = "drop-double-neg"
    numerics = Numerics.exact()

    def run(self, gm, ctx):
        stats = Counter()
        for node in list(gm.graph.nodes):
            inner = node.args[0] if node.target in (torch.neg, "neg") and node.args else None
            if getattr(inner, "target", None) in (torch.neg, "neg") and len(inner.users) == 1:
                node.replace_all_uses_with(inner.args[0])
                gm.graph.erase_node(node)
                gm.graph.erase_node(inner)
                stats["removed"] += 1
        gm.recompile()
        return PassResult(gm, modified=stats["removed"] > 0, stats=stats)


class Before(nn.Module):
    def forward(self, x):
        return torch.relu(torch.neg(torch.neg(x)))


class Expected(nn.Module):
    def forward(self, x):
        return torch.relu(x)


if __name__ == "__main__":
    x = torch.randn(2, 8)
    verify_rewrite("drop-double-neg", Before(), Expected(), (x,))
    assert_pass_preserves("drop-double-neg", Before(), (x,), expect_modified=True)
    result = PassManager("drop-double-neg,eliminate-dead-code").run(
        capture(Before(), (x,)).graph, PassContext(sample_inputs=(x,))
    )
    print([(r.spec, r.status, r.stats) for r in result.records])

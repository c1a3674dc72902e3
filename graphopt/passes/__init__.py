"""graphopt's built-in passes; importing this package registers them all.

One module per pass, named after the pass with ``_`` (``fold-conv-bn`` -> ``fold_conv_bn``).
"""

from graphopt.passes.eliminate_dead_code import EliminateDeadCode
from graphopt.passes.equalize import EqualizeLayers
from graphopt.passes.fold_constants import FoldConstants
from graphopt.passes.fold_conv_bn import FoldConvBN
from graphopt.passes.fuse_attention import FuseAttention
from graphopt.passes.merge_convs import MergeConvs
from graphopt.passes.remove_identity import RemoveIdentity
from graphopt.passes.reparameterize import Reparameterize
from graphopt.passes.substitute_monarch import SubstituteMonarch
from graphopt.passes.tune_conv_bn import TuneConvBN

__all__ = [
    "EliminateDeadCode",
    "EqualizeLayers",
    "FoldConstants",
    "FoldConvBN",
    "FuseAttention",
    "MergeConvs",
    "RemoveIdentity",
    "Reparameterize",
    "SubstituteMonarch",
    "TuneConvBN",
]

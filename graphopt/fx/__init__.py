"""What passes need to read and change a ``torch.fx`` graph, written once for all of them.

``effects``: the in-place rule (which nodes write, which values and attribute tensors the writes
reach, dead-code removal that keeps them). ``memo``: what one run of a pass works out about its
graph, once (float64 copies of weights, which nodes write or alias). ``tensors``: normal tensors
and parameters whatever mode a pass runs in. ``constants``: attribute tensors and numbers a graph
reads. ``names``: free attribute names. ``layers``: Conv / ConvTranspose / Linear / BatchNorm
seen alike in module and functional form, and who shares their weights. ``ops``: elementwise
arithmetic in all its spellings. ``branches``: a convolution or average pool as a float64
linear term of its input.
"""

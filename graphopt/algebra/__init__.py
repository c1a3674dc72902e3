"""The mathematics of graphopt's rewrites, apart from any graph: merging convolutions into one
(:mod:`~graphopt.algebra.conv_merge`), the dynamic program that plans which to merge
(:mod:`~graphopt.algebra.merge_dp`), Monarch factorisation and the closed-form projections of a
dense matrix onto structured ones (:mod:`~graphopt.algebra.monarch`), and folding BatchNorm into
a neighbouring layer (:mod:`~graphopt.algebra.bn_fold`). Pure functions on tensors, arrays and
plain dataclasses, tested exhaustively on their own: no ``torch.fx``, and nothing from graphopt
but :mod:`graphopt.errors`.
"""

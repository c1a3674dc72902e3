"""TopK, ArgMax/ArgMin, CumSum, Trilu, GatherElements, ScatterND, ScatterElements, Einsum."""

from __future__ import annotations

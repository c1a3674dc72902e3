"""How far Tune mode's float32 gradients are from the exact ones, next to Eval mode's own.

    python benchmarks/tune_mode_gradients.py [model] [--batch 16] [--size 160]

At fine-tuning sizes a float32 gradient of a deep network is itself several 1e-3 away from the
exact (float64) one on its worst parameter (long reductions that cancel), so "Tune vs Eval"
measures both modes' rounding. This script computes the exact gradient in float64 (Eval mode)
and prints, per parameter, the error of Tune mode (float32) and of Eval mode (float32) against
it, relative to the parameter's largest exact gradient: Tune mode should be no worse.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import graphopt
from graphopt import zoo


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.double() for n, p in model.named_parameters()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="mobilenetv2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    base = zoo.get(args.model).model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)
    exact = _grads(copy.deepcopy(base).double(), x.double(), y)
    eval32 = _grads(copy.deepcopy(base), x, y)
    tune32 = _grads(graphopt.tune_mode(base, (x[:1],)), x, y)
    rows = []
    for name, ref in exact.items():
        scale = float(ref.abs().max()) or 1.0
        rows.append(
            (
                float((tune32[name] - ref).abs().max()) / scale,
                float((eval32[name] - ref).abs().max()) / scale,
                name,
            )
        )
    rows.sort(reverse=True)
    print(f"{args.model}, batch {args.batch} at {args.size}x{args.size}; error vs float64 Eval:")
    for tune, ev, name in rows[:5]:
        print(f"  Tune {tune:.1e}   Eval {ev:.1e}   {name}")
    worst_tune, worst_eval = max(r[0] for r in rows), max(r[1] for r in rows)
    print(f"worst parameter: Tune {worst_tune:.1e}, Eval {worst_eval:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

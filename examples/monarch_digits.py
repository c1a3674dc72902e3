"""Dense-to-Monarch on a small MLP-Mixer: train it on scikit-learn's 8x8 digits, let
``substitute-monarch`` replace its channel-MLP layers (512 -> 2048 -> 512 on 16 tokens) where
ONNX Runtime measures them faster, fine-tune briefly through the ``finetune`` hook, and compare
accuracy and latency before and after.

Run: python examples/monarch_digits.py [--epochs 4] [--finetune-epochs 2]

The projection onto Monarch matrices is an initialisation (Dao et al. fine-tune after it): on a
trained weight it keeps roughly half the layer's output energy, so the error budget is opened
(``max_error=1``) and the fine-tuning hook restores the accuracy. The trained dense weights are
cached under graphopt's cache directory, so a second run skips the dense training.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt._util import cache_dir
from graphopt.zoo import digits_data

PIPELINE = (
    "substitute-monarch{nblocks=4,block_diagonal=false,low_rank=false,max_error=1.0,"
    "output_cosine=0.5}"
)


class MixerBlock(nn.Module):
    """Token mixing (an MLP across the 16 patches) then channel mixing (512 -> 2048 -> 512)."""

    def __init__(self, tokens: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 64), nn.GELU(), nn.Linear(64, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsMixer(nn.Module):
    """MLP-Mixer for 1x8x8 images: 2x2 patches (16 tokens), width 512, MLP 2048; the head reads
    all 16 tokens (flattened), which trains several times faster here than mean pooling."""

    def __init__(self, dim: int = 512, hidden: int = 2048, depth: int = 1) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.Sequential(*[MixerBlock(16, dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(16 * dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 1, 8, 8) -> (N, 16, 4): row-major 2x2 patches
        patches = x.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        return self.head(self.norm(self.blocks(self.embed(patches))).flatten(1))


def train(model: nn.Module, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    """Adam, cosine-decayed learning rate, batch 64, on the digits train split."""
    x, y = digits_data("train")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + 63) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
    return model.eval()


def accuracy(predict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.as_tensor(predict(x)).argmax(-1) == y).double().mean()) * 100


def dense_model(epochs: int, seed: int) -> DigitsMixer:
    """The trained dense mixer, from the cache directory when an earlier run trained it."""
    path = cache_dir() / "examples" / f"digits-mixer-e{epochs}-s{seed}.pt"
    torch.manual_seed(seed)
    model = DigitsMixer()
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"dense mixer loaded from {path}")
        return model.eval()
    except (OSError, RuntimeError):
        pass
    start = time.perf_counter()
    train(model, epochs, lr=1e-3, seed=seed)
    print(f"dense mixer trained: {epochs} epochs in {time.perf_counter() - start:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x_test, y_test = digits_data("test")
    x_train, _ = digits_data("train")
    model = dense_model(args.epochs, args.seed)
    dense_acc = accuracy(model, x_test, y_test)

    projected_acc: list[float] = []

    def finetune(gm: torch.fx.GraphModule) -> None:
        projected_acc.append(accuracy(gm.eval(), x_test, y_test))  # the projection alone
        start = time.perf_counter()
        train(gm, args.finetune_epochs, lr=3e-4, seed=args.seed + 1)
        print(f"fine-tuned the substituted graph: {time.perf_counter() - start:.0f} s")

    result = graphopt.optimize(
        copy.deepcopy(model),
        "cpu",
        example_inputs=(x_test[:1],),  # latency at batch 1: one image, 16 tokens
        pipeline=PIPELINE,
        calibration_data=[(x_train[i : i + 128],) for i in range(0, 512, 128)],
        finetune=finetune,
    )
    report = result.report
    print(report)
    monarch_acc = accuracy(result, x_test, y_test)  # the ONNX Runtime artifact itself
    print()
    projected = f"{projected_acc[0]:.2f}%" if projected_acc else "-"
    print(
        f"test accuracy: dense {dense_acc:.2f}%  ->  Monarch projected {projected}  ->  "
        f"fine-tuned {monarch_acc:.2f}% (the ONNX Runtime artifact)"
    )
    print(
        f"latency, batch 1, ONNX Runtime ({report.threads} threads, same run): "
        f"dense {report.latency_baseline.median_ms:.3f} ms -> "
        f"Monarch {report.latency_optimized.median_ms:.3f} ms ({report.speedup:.2f}x)"
    )


if __name__ == "__main__":
    main()

"""Depth compression on a MobileNetV2-style network trained on scikit-learn's digits: the whole
flow of ``merge-convs{budget=...}`` -- tables measured on ONNX Runtime, importance of every
activation set on a held-out split, the two-stage DP plan, fine-tuning through the ``finetune``
hook, the final merge -- with accuracy and latency before and after.

Run: python examples/merge_convs_digits.py [--budget 0.85] [--epochs 15] [--finetune-epochs 60]

The 8x8 digits are upsampled to 64x64 so that the convs do measurable work (at 32x32 the
whole network takes 0.06 ms, below what this machine times reliably). The network has
MobileNetV2's layout: a stride-2 3x3 stem, a block without expansion, five inverted residual
blocks (1x1 expand x4, 3x3 depthwise, 1x1 linear projection; ReLU6; strides 2 and residuals as
in MobileNetV2), a 1x1 head, global pooling, a linear classifier. The training split is cut in two: the first 80%
trains, the last 20% is the held-out split the importance is measured on (``metric``: accuracy
there); the test split is only used for the figures. Fine-tuning distils the original network
into the compressed one (cross-entropy + KL to its logits). The trained network is cached under
graphopt's cache directory.
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
from graphopt.backends.measure import time_interleaved
from graphopt.target import Target
from graphopt.zoo import digits_data

SIZE = 64


def _cbr(i: int, o: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(i, o, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(o),
        nn.ReLU6(),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, i: int, o: int, stride: int, expand: int) -> None:
        super().__init__()
        h = i * expand
        expansion = _cbr(i, h, 1) if expand != 1 else []  # MobileNetV2's first block has none
        self.conv = nn.Sequential(
            *expansion,
            *_cbr(h, h, 3, stride, h),
            nn.Conv2d(h, o, 1, bias=False),
            nn.BatchNorm2d(o),
        )
        self.residual = stride == 1 and i == o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class DigitsMobileNet(nn.Module):
    """MobileNetV2's layout, scaled to 1x64x64 digits: a stride-2 stem, a block without
    expansion, then expansion-4 blocks with strides 2 and residuals, a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_cbr(1, 16, 3, 2),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
            InvertedResidual(32, 32, 1, 4),
            InvertedResidual(32, 32, 1, 4),
            *_cbr(32, 128, 1),
        )
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def data(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_data(split)
    return F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False), y


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    teacher: torch.Tensor | None = None,
    temperature: float = 4.0,
) -> nn.Module:
    """Adam, cosine-decayed learning rate, batch 64; with ``teacher`` logits, cross-entropy plus
    knowledge distillation (Hinton et al.: KL at ``temperature``, scaled by its square)."""
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
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            if teacher is not None:
                t = temperature
                soft = F.softmax(teacher[idx] / t, dim=1)
                loss = loss + t * t * F.kl_div(
                    F.log_softmax(out / t, dim=1), soft, reduction="batchmean"
                )
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def accuracy(predict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = torch.as_tensor(predict(x))
    return float((out.argmax(-1) == y).double().mean()) * 100


def trained_model(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    path = cache_dir() / "examples" / f"digits-mobilenetv2-{SIZE}px-e{epochs}-s{seed}.pt"
    torch.manual_seed(seed)
    model = DigitsMobileNet()
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"trained network loaded from {path}")
        return model.eval()
    except (OSError, RuntimeError):
        pass
    start = time.perf_counter()
    train(model, x, y, epochs, lr=3e-3, seed=seed)
    print(f"trained: {epochs} epochs in {time.perf_counter() - start:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.85)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=60)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    x_all, y_all = data("train")
    cut = len(y_all) * 4 // 5
    x_train, y_train, x_val, y_val = x_all[:cut], y_all[:cut], x_all[cut:], y_all[cut:]
    x_test, y_test = data("test")
    model = trained_model(x_train, y_train, args.epochs, args.seed)
    base_test = accuracy(model, x_test, y_test)

    def held_out_accuracy(predict) -> float:  # the importance: accuracy on the held-out split
        return accuracy(lambda x: predict(x.numpy()), x_val, y_val)

    before_finetune: list[float] = []
    with torch.no_grad():
        teacher = model(x_train)  # the original network distils into the compressed one

    def finetune(gm: torch.fx.GraphModule) -> None:
        before_finetune.append(accuracy(gm.eval(), x_test, y_test))  # architecture, no training
        start = time.perf_counter()
        train(gm, x_train, y_train, args.finetune_epochs, args.finetune_lr, args.seed + 1, teacher)
        print(f"fine-tuned the fixed architecture: {time.perf_counter() - start:.0f} s")

    default = Target.parse("cpu").default_pipeline
    pipeline = f"{default},merge-convs{{budget={args.budget},progress=true}}"
    example = (x_test[:1],)  # latency at batch 1
    calibration = [(x_val[i : i + 64],) for i in range(0, 256, 64)]
    result = graphopt.optimize(
        copy.deepcopy(model),
        "cpu",
        example_inputs=example,
        pipeline=pipeline,
        calibration_data=calibration,
        metric=held_out_accuracy,
        finetune=finetune,
    )
    print(result.report)
    compressed_test = accuracy(result, x_test, y_test)  # the ONNX Runtime artifact itself
    exact = graphopt.optimize(copy.deepcopy(model), "cpu", example, measure=False)
    arrays = [example[0].numpy()]
    timed = time_interleaved(
        {
            "exact": lambda: exact.artifact.run(arrays),
            "compressed": lambda: result.artifact.run(arrays),
        },
        runs=args.runs,
        max_time_s=60,
    )
    report = result.report
    print()
    print(
        f"test accuracy: original {base_test:.2f}%  ->  activations removed, before fine-tuning "
        f"{before_finetune[0]:.2f}%  ->  fine-tuned and merged {compressed_test:.2f}% "
        f"(the ONNX Runtime artifact; {compressed_test - base_test:+.2f} points)"
    )
    print(
        f"latency, batch 1, ONNX Runtime ({report.threads} threads, same run): original export "
        f"{report.latency_baseline.median_ms:.3f} ms -> compressed "
        f"{report.latency_optimized.median_ms:.3f} ms ({report.speedup:.2f}x); against "
        f"graphopt's exact pipeline {timed['exact'].median_ms:.3f} ms -> "
        f"{timed['compressed'].median_ms:.3f} ms "
        f"({timed['exact'].median_ms / timed['compressed'].median_ms:.2f}x)"
    )


if __name__ == "__main__":
    main()

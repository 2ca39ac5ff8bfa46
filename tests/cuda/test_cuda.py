"""The CUDA kernels against the CPU core and a float64 reference (needs a CUDA device)."""
import numpy as np
import pytest
import torch

import afie_fast as af
from afie_fast import _ext
import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _ext._C.cuda_compiled, reason="afie_fast was built without CUDA kernels"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [3, 64, 130])
def test_device_accumulator_matches_reference(dtype, layout, acc_dtype, channels):
    g = torch.Generator(device="cuda").manual_seed(channels)
    y = (torch.randn(16, channels, 9, 11, generator=g, device="cuda") * 2 + 3).to(dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    acc = af.CovarianceAccumulator(channels, device="cuda", dtype=acc_dtype)
    for part in y.split(5):
        acc.update(part)
    cpu = af.CovarianceAccumulator(channels)
    for part in y.cpu().split(5):
        cpu.update(part)
    mean, cov = reference.covariance(y)
    tol = 1e-5 if acc_dtype == torch.float32 else 1e-10
    assert acc.count == cpu.count == y.shape[0] * 99
    assert reference.rel_err(acc.covariance().cpu().double(), cov) <= tol
    assert reference.rel_err(acc.mean.cpu().double(), mean) <= tol
    assert reference.rel_err(acc.covariance().cpu().double(), cpu.covariance()) <= tol


def test_device_merge():
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(20, 40, 6, 6, generator=g, device="cuda")
    a = af.CovarianceAccumulator(40, device="cuda").update(y[:7])
    b = af.CovarianceAccumulator(40, device="cuda").update(y[7:])
    a.merge(b)
    assert reference.rel_err(a.covariance().cpu(), reference.covariance(y)[1]) <= 1e-10


def test_fp16_large_activations_do_not_overflow():
    # Values near 3e4: their squares and sums overflow fp16 (max 65504), not the accumulator.
    g = torch.Generator(device="cuda").manual_seed(1)
    y = (torch.randn(32, 8, 16, 16, generator=g, device="cuda") * 2000 + 3e4).half()
    acc = af.CovarianceAccumulator(8, device="cuda", dtype=torch.float32).update(y)
    cov = acc.covariance()
    assert torch.isfinite(cov).all()
    assert reference.rel_err(cov.cpu().double(), reference.covariance(y)[1]) <= 1e-4


def test_nan_batch_is_skipped_and_reported():
    acc = af.CovarianceAccumulator(4, device="cuda")
    acc.update(torch.randn(2, 4, 3, 3, device="cuda"))
    bad = torch.randn(2, 4, 3, 3, device="cuda")
    bad[0, 1, 1, 1] = float("nan")
    acc.update(bad)  # no host sync per batch: the error surfaces on the next read
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.covariance()


def test_entropy_kernel_matches_cpu():
    s = torch.rand(5, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out_gpu = torch.empty(5, dtype=torch.float64, device="cuda")
    _ext._C.spectra_entropy(s.cuda(), out_gpu, torch.cuda.current_stream().cuda_stream)
    out_cpu = torch.empty(5, dtype=torch.float64)
    _ext._C.spectra_entropy(s, out_cpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-14, atol=0)


def test_score_on_cuda_matches_cpu():
    from afie_fast.models import resnet18_cifar

    torch.manual_seed(0)
    model = resnet18_cifar().eval()
    xs = [torch.randn(16, 3, 32, 32) for _ in range(3)]
    cpu = af.score(model, xs, progress=False)
    gpu = af.score(model.cuda(), xs, progress=False)
    model.cpu()
    for a, b in zip(cpu, gpu):
        assert b.n_samples == a.n_samples
        assert b.afie == pytest.approx(a.afie, rel=1e-4)
        np.testing.assert_allclose(b.filter_scores["variance"], a.filter_scores["variance"], rtol=1e-3, atol=1e-6)


def test_backend_reports_the_device():
    info = af.backend_info()
    assert info["cuda_compiled"] and info["cuda_device_present"]

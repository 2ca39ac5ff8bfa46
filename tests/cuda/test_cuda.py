"""The CUDA kernels against the CPU core and a float64 reference (needs a CUDA device)."""
import warnings

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


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_device_accumulator_reads_lattice_views_in_place(layout):
    # score(positions=...) hands the core y[:, :, oy::s, ox::s]: strided in every dim.
    g = torch.Generator(device="cuda").manual_seed(3)
    y = torch.randn(6, 70, 23, 19, generator=g, device="cuda") * 1.5 - 2
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    view = y[:, :, 1::3, 2::4]
    acc = af.CovarianceAccumulator(70, device="cuda", dtype=torch.float64).update(view)
    mean, cov = reference.covariance(view)
    assert acc.count == view.shape[0] * view.shape[2] * view.shape[3]
    assert reference.rel_err(acc.covariance().cpu(), cov) <= 1e-10
    assert reference.rel_err(acc.mean.cpu(), mean) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_wide_layer_many_tiles_and_slices(dtype):
    # 520 channels: 5 × 5 tiles of 128 (the last one partial), on and off the diagonal;
    # 64·14·14 observations split into many slices whose partial sums meet in M2.
    g = torch.Generator(device="cuda").manual_seed(4)
    y = (torch.randn(64, 520, 14, 14, generator=g, device="cuda") + torch.linspace(-3, 3, 520, device="cuda")[:, None, None]).to(dtype)
    y = y.contiguous(memory_format=torch.channels_last)
    acc = af.CovarianceAccumulator(520, device="cuda", dtype=torch.float32).update(y[:40]).update(y[40:])
    mean, cov = reference.covariance(y)
    assert reference.rel_err(acc.covariance().cpu().double(), cov) <= 1e-5
    assert reference.rel_err(acc.mean.cpu().double(), mean) <= 1e-5


def test_updates_never_wait_on_the_host_and_use_the_callers_stream():
    # Each batch is written on a side stream after a long device sleep: kernels launched on
    # any other stream would read it before it exists. Sync debug mode turns any torch call
    # that synchronises with the host into an error.
    g = torch.Generator(device="cuda").manual_seed(5)
    base = [torch.randn(8, 96, 12, 12, generator=g, device="cuda") for _ in range(3)]
    side = torch.cuda.Stream()
    acc = af.CovarianceAccumulator(96, device="cuda", dtype=torch.float32)
    side.wait_stream(torch.cuda.current_stream())
    try:
        with warnings.catch_warnings():  # "a prototype feature"
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        with torch.cuda.stream(side):
            for b in base:
                torch.cuda._sleep(20_000_000)
                acc.update((b * 2 - 1).half())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side.synchronize()
    ys = [(b * 2 - 1).half() for b in base]
    assert reference.rel_err(acc.covariance().cpu().double(), reference.covariance(ys)[1]) <= 1e-5


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


def test_score_with_a_positions_budget_on_cuda_matches_cpu():
    # The lattice is drawn on the host from the seed, so both devices see the same positions.
    from afie_fast.models import resnet18_cifar

    torch.manual_seed(1)
    model = resnet18_cifar().eval()
    xs = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    cpu = af.score(model, xs, progress=False, positions=50, seed=3)
    gpu = af.score(model.cuda(), xs, progress=False, positions=50, seed=3)
    model.cpu()
    for a, b in zip(cpu, gpu):
        assert b.n_samples == a.n_samples
        assert b.afie == pytest.approx(a.afie, rel=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layers_observed_through_their_input_on_cuda_match_cpu(channels_last):
    # 1×1 expansions at stride 1 and 2 and a Linear expansion accumulate their input on the
    # device (strided views of it) and are mapped on the host: the same as on the CPU.
    from nets import Expansions

    torch.manual_seed(2)
    model = Expansions().eval()
    xs = [torch.randn(8, 3, 9, 9) for _ in range(3)]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    cpu = af.score(model, xs, progress=False, linear=True)
    gpu = af.score(model.cuda(), xs, progress=False, linear=True)
    model.cpu()
    for a, b in zip(cpu, gpu):
        assert b.n_samples == a.n_samples
        assert b.afie == pytest.approx(a.afie, rel=1e-4)
        np.testing.assert_allclose(b.filter_scores["variance"], a.filter_scores["variance"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", [((8, 40, 37), "contiguous"), ((4, 40, 3, 9, 11), "contiguous"),
                                          ((4, 40, 3, 9, 11), "channels_last_3d"), ((4, 24, 5, 6, 14), "sliced")])
def test_signals_and_volumes_accumulate_on_the_device(dtype, acc_dtype, shape, layout):
    # Conv1d outputs (N, C, L) and Conv3d outputs (N, C, D, H, W), any layout, as the CPU core
    # and the float64 reference see them.
    g = torch.Generator(device="cuda").manual_seed(shape[1])
    y = (torch.randn(shape, generator=g, device="cuda") * 2 + 3).to(dtype)
    if layout == "channels_last_3d":
        y = y.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        y = y[:, 2:22, :, :, ::2]
    c = y.shape[1]
    acc = af.CovarianceAccumulator(c, device="cuda", dtype=acc_dtype)
    for part in y.split(3):
        acc.update(part)
    flat = y.double().cpu().movedim(1, -1).reshape(-1, c)
    mean, cov = reference.covariance(flat[:, :, None, None])
    tol = 1e-5 if acc_dtype == torch.float32 else 1e-10
    assert acc.count == flat.shape[0]
    assert reference.rel_err(acc.covariance().cpu().double(), cov) <= tol
    assert reference.rel_err(acc.mean.cpu().double(), mean) <= tol


@pytest.mark.parametrize("name", ["resnet1d", "tcn", "resnet3d", "unet"])
def test_every_conv_kind_scores_on_cuda_as_on_the_cpu(name):
    from nets import CONV_KINDS, randomised

    make, shape = CONV_KINDS[name]
    torch.manual_seed(4)
    model = randomised(make()).eval()
    xs = [torch.randn(shape) for _ in range(3)]
    for memory_format in [None] + ([torch.channels_last_3d] if len(shape) == 5 else []):
        if memory_format is not None:
            model = model.to(memory_format=memory_format)
            xs = [x.contiguous(memory_format=memory_format) for x in xs]
        cpu = af.score(model, xs, progress=False, positions=64)
        gpu = af.score(model.cuda(), xs, progress=False, positions=64)
        model.cpu()
        for a, b in zip(cpu, gpu):
            assert (b.kind, b.n_samples) == (a.kind, a.n_samples)
            assert b.afie == pytest.approx(a.afie, rel=1e-4)
            np.testing.assert_allclose(b.filter_scores["variance"], a.filter_scores["variance"], rtol=1e-3, atol=1e-6)


def test_backend_reports_the_device():
    info = af.backend_info()
    assert info["cuda_compiled"] and info["cuda_device_present"]

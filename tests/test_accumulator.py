"""CovarianceAccumulator against numpy's float64 np.cov."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import afie_fast as af
import reference


def random_splits(n, gen, parts=4):
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: parts - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


def check_stream_matches_np_cov(acc, y, gen, cov_tol, parts=4):
    """Stream y into acc in random parts; count, covariance and mean against np.cov."""
    chunks = torch.split(y, random_splits(y.shape[0], gen, parts))
    for p in chunks:
        acc.update(p)
    mean, cov = reference.covariance(chunks)
    assert acc.count == y.shape[0] * y.shape[2] * y.shape[3]
    assert reference.rel_err(acc.covariance().numpy(), cov) <= cov_tol
    assert reference.rel_err(acc.mean.numpy(), mean) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_matches_np_cov(gen, dtype, layout):
    base = torch.randn(23, 24, 9, 7, generator=gen, dtype=torch.float64) * torch.rand(24, 1, 1, generator=gen, dtype=torch.float64)
    if layout == "sliced":
        y = base.to(dtype)[:, ::2, 1:8:2, :]  # strided channels and rows: no single run
        assert not y.is_contiguous()
    elif layout == "channels_last":
        y = base.to(dtype).contiguous(memory_format=torch.channels_last)
    else:
        y = base.to(dtype)
    check_stream_matches_np_cov(af.CovarianceAccumulator(y.shape[1]), y, gen, cov_tol=1e-8)


def test_large_means_unit_variance(gen):
    # Channel means of 1e4 with unit variance: Σyyᵀ − nμμᵀ would lose ~8 digits here.
    y = torch.randn(64, 16, 6, 6, generator=gen, dtype=torch.float64) + 1e4
    acc = af.CovarianceAccumulator(16)
    for p in torch.split(y, random_splits(64, gen, parts=7)):
        acc.update(p)
    _, cov = reference.covariance([y])
    assert reference.rel_err(acc.covariance().numpy(), cov) <= 1e-8


def test_one_batch_equals_many(gen):
    y = torch.randn(64, 12, 5, 5, generator=gen) * 3 + 7
    one = af.CovarianceAccumulator(12).update(y)
    many = af.CovarianceAccumulator(12)
    for i in range(64):
        many.update(y[i : i + 1])
    assert reference.rel_err(many.covariance().numpy(), one.covariance().numpy()) <= 1e-10
    assert reference.rel_err(many.mean.numpy(), one.mean.numpy()) <= 1e-10


@pytest.mark.parametrize("shape", [(50, 8), (20, 8, 11)])
def test_2d_and_3d_batches(gen, shape):
    y = torch.randn(*shape, generator=gen)
    acc = af.CovarianceAccumulator(8).update(y)
    y4 = y.reshape(*shape, *([1] * (4 - len(shape))))
    assert reference.rel_err(acc.covariance().numpy(), reference.covariance([y4])[1]) <= 1e-10


def test_merge_equals_single_stream(gen):
    y = torch.randn(40, 10, 4, 4, generator=gen) * 2 + 5
    a, b = af.CovarianceAccumulator(10), af.CovarianceAccumulator(10)
    a.update(y[:13])
    b.update(y[13:30]).update(y[30:])
    a.merge(b)
    _, cov = reference.covariance([y])
    assert a.count == 40 * 16
    assert reference.rel_err(a.covariance().numpy(), cov) <= 1e-10
    empty = af.CovarianceAccumulator(10)
    empty.merge(a)
    assert reference.rel_err(empty.covariance().numpy(), cov) <= 1e-12


def test_float32_state(gen):
    y = torch.randn(30, 6, 8, 8, generator=gen)
    acc = af.CovarianceAccumulator(6, dtype=torch.float32).update(y)
    assert acc.covariance().dtype == torch.float32
    assert reference.rel_err(acc.covariance().numpy(), reference.covariance([y])[1]) <= 1e-5


def test_state_dict_round_trip(gen):
    y = torch.randn(10, 5, 3, 3, generator=gen)
    acc = af.CovarianceAccumulator(5).update(y)
    clone = af.CovarianceAccumulator(5)
    clone.load_state_dict(acc.state_dict())
    assert clone.count == acc.count
    assert torch.equal(clone.covariance(), acc.covariance())
    clone.update(y)  # keeps streaming from the loaded state
    assert reference.rel_err(clone.covariance().numpy(), reference.covariance([y, y])[1]) <= 1e-10


def test_numpy_arrays_reach_the_core(np_rng):
    # The core reads any DLPack producer: here numpy, without torch tensors.
    from afie_fast import _ext

    y = np_rng.normal(size=(7, 4, 3, 3))
    n, mean, m2 = np.zeros(1), np.zeros(4), np.zeros((4, 4))
    _ext._C.comoments_update(y, n, mean, m2)
    x = y.transpose(0, 2, 3, 1).reshape(-1, 4)
    np.testing.assert_allclose(m2 / (n[0] - 1), np.cov(x, rowvar=False), rtol=1e-12)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Wide layers take an all-threads path only with more than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("channels", [520, 1030])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "every_second"])
@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32])
def test_wide_layers_match_np_cov(gen, channels, layout, compute_dtype, threads):
    # ≥ 512 channels: BLAS's all-threads path (update_wide), except NCHW float32 products
    # (update_gram_wide); 2,400-4,800 observations per batch, several chunks. "sliced" and
    # "every_second" are float32 views (channels, columns apart).
    base = torch.randn(3, 2 * channels, 40, 40, generator=gen, dtype=torch.float64) * 2 + 5
    y = {"contiguous": base[:, :channels].float(),
         "channels_last": base[:, :channels].float().contiguous(memory_format=torch.channels_last),
         "sliced": base.float()[:, ::2],
         "every_second": base.float()[:, :channels, :, 1::2]}[layout]
    acc = af.CovarianceAccumulator(channels, compute_dtype=compute_dtype)
    parts = [y[:2], y[2:]]
    for p in parts:
        acc.update(p)
    mean, cov = reference.covariance(parts)
    tol = 1e-8 if compute_dtype == torch.float64 else 1e-5
    assert acc.count == y.shape[0] * y.shape[2] * y.shape[3]
    assert reference.rel_err(acc.covariance().numpy(), cov) <= tol
    assert reference.rel_err(acc.mean.numpy(), mean) <= 1e-8
    assert torch.equal(acc.comoment, acc.comoment.T)  # both triangles written


@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32])
def test_wide_layer_nonfinite_in_a_later_chunk_leaves_state_unchanged(gen, compute_dtype, threads):
    acc = af.CovarianceAccumulator(520, compute_dtype=compute_dtype).update(torch.randn(1, 520, 10, 10, generator=gen))
    before = acc.state_dict()
    y = torch.randn(3, 520, 40, 40, generator=gen)
    y[-1, 7, -1, -1] = float("nan")  # the last observation: in the last chunk either way
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(y)
    after = acc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def expected_kernel():
    """The gram kernel this CPU should run, from its flags (None: no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    if not {"avx2", "fma"} <= flags:
        return "none"
    return "avx512" if {"avx512f", "avx512dq"} <= flags else "avx2"


def test_gram_kernel_is_the_widest_the_cpu_has():
    # Narrow NCHW layers with float32 products run on csrc/gram.cpp (AVX-512, else AVX2);
    # the tests below then check that kernel, not the BLAS fallback.
    want = expected_kernel()
    if want is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    assert af.backend_info()["comoment_kernel"] == want


@pytest.mark.parametrize("n,ld", [(1, 16), (5, 48), (24, 16), (25, 512), (67, 272), (130, 64)])
def test_gram_kernel_alone_adds_the_upper_triangle(gen, n, ld):
    # The kernel bench_core.py times: rows off its 6×4 tiles and its 24-row padding, rows
    # of one to 32 AVX-512 steps; c starts random (the kernel adds) and its lower triangle
    # must stay as it was. Reference: float64 products, error bound from |a|·|a|ᵀ.
    from afie_fast import _ext

    rows = -(-n // 24) * 24
    a = torch.zeros(rows, ld)
    a[:n] = torch.randn(n, ld, generator=gen) + 2.0
    c0 = torch.randn(n, n, generator=gen, dtype=torch.float64)
    c = c0.clone()
    _ext.gram_upper_add(a, c)
    a64 = a[:n].double()
    want = c0 + torch.triu(a64 @ a64.T)
    bound = 1e-5 * torch.triu(a64.abs() @ a64.abs().T) + 1e-12
    assert ((c - want).abs() <= bound).all()
    assert torch.equal(torch.tril(c, -1), torch.tril(c0, -1))


def test_gram_kernel_alone_checks_its_arguments():
    from afie_fast import _ext

    c = torch.zeros(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"a: expected \[24, a multiple of 16\]"):
        _ext.gram_upper_add(torch.zeros(5, 16), c)
    with pytest.raises(ValueError, match="padding rows .* must be zero"):
        _ext.gram_upper_add(torch.ones(24, 16), c)


def test_avx2_kernel_where_avx512_runs_by_default():
    # Machines with AVX-512 would otherwise never run the AVX2 kernel that other CPUs use:
    # the float32-products tests again, in a process that asks for AVX2.
    if expected_kernel() != "avx512":
        pytest.skip("this CPU runs the AVX2 kernel (or none) by default: the tests above check it")
    # Without the PYTEST_* variables of an xdist worker, which would make the child's
    # plugins (pytest-benchmark) believe they run under xdist.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {"AFIE_GRAM_KERNEL": "avx2"}
    here = os.path.dirname(__file__)  # not the repo root, whose afie_fast/ is the uncompiled source
    probe = subprocess.run([sys.executable, "-c", "import afie_fast as af; print(af.backend_info()['comoment_kernel'])"],
                           env=env, capture_output=True, text=True, check=True, cwd=here)
    assert probe.stdout.strip() == "avx2"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "float32_products_match_np_cov or gram_kernel_alone"], env=env, capture_output=True, text=True, cwd=here)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout


@pytest.mark.parametrize("channels", [1, 5, 13, 64, 200, 256, 301])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "every_second", "every_third", "float16"])
def test_float32_products_match_np_cov(gen, channels, layout, threads):
    # Channel counts off the kernel's 3×4 tiles, maps of 13×11 (chunks end mid-image and
    # are not whole 8-wide steps), several chunks per thread for 64 and 200 channels and
    # two shared chunks, the second short, for 256 and 301 (update_gram_wide), means far
    # from zero. The strided layouts are float32 views, as a stride-2 conv's input or a
    # subsampled map reaches the core: "every_second" ends on the last float of the
    # storage (the gather's wide loads must stop short of it), "every_third" takes the
    # scalar gather, rows and images apart.
    base = torch.randn(24, 2 * channels, 13, 22, generator=gen, dtype=torch.float64)
    base = base * torch.rand(2 * channels, 1, 1, generator=gen, dtype=torch.float64) * 3 + 40
    f32 = base.float()
    y = {"contiguous": base[:, :channels, :, :11].contiguous().float(),
         "sliced": base[:, ::2, :, ::2].float(),  # dense again after the cast
         "every_second": f32[:, 1::2, :, 1::2],
         "every_third": f32[:, :channels, ::2, ::3],
         "float16": base[:, :channels, :, :11].contiguous().half()}[layout]
    if layout.startswith("every"):
        assert not y.is_contiguous() and y.stride(3) > 1
    acc = af.CovarianceAccumulator(channels, compute_dtype=torch.float32)
    check_stream_matches_np_cov(acc, y, gen, cov_tol=2e-5, parts=3)
    assert torch.equal(acc.comoment, acc.comoment.T)


def test_float32_products_nonfinite_leaves_state_unchanged(gen, threads):
    acc = af.CovarianceAccumulator(64, compute_dtype=torch.float32).update(torch.randn(2, 64, 32, 32, generator=gen))
    before = acc.state_dict()
    y = torch.randn(8, 64, 32, 32, generator=gen)
    y[-1, 63, -1, -1] = float("inf")  # the last chunk of the last thread
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(y)
    after = acc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("channels", [256, 301, 1030])
@pytest.mark.parametrize("layout", ["contiguous", "every_second"])
@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
def test_wide_short_batches_match_np_cov(gen, channels, layout, state_dtype, threads):
    # Fewer observations than channels per batch, as a 7×7 map's: one shared chunk, whose
    # products a float64 state takes straight into its rows. Batches of 1 to 20 images of
    # 7×7 (49 to 980 observations), the first on the empty state; means far from zero.
    base = torch.randn(30, channels, 7, 14, generator=gen, dtype=torch.float64)
    base = base * torch.rand(channels, 1, 1, generator=gen, dtype=torch.float64) * 3 + 20
    y = {"contiguous": base[..., :7].contiguous().float(), "every_second": base.float()[..., ::2]}[layout]
    acc = af.CovarianceAccumulator(channels, dtype=state_dtype, compute_dtype=torch.float32)
    parts = torch.split(y, [1, 20, 2, 7])
    for p in parts:
        acc.update(p)
    mean, cov = reference.covariance(parts)
    assert acc.count == 30 * 49
    assert reference.rel_err(acc.covariance().double().numpy(), cov) <= 2e-5
    assert reference.rel_err(acc.mean.double().numpy(), mean) <= (1e-8 if state_dtype == torch.float64 else 1e-6)
    assert torch.equal(acc.comoment, acc.comoment.T)


@pytest.mark.parametrize("first", [True, False])
def test_wide_short_batch_nonfinite_leaves_state_unchanged(gen, first, threads):
    # The in-place path adds to the state's own rows: each worker checks every channel first.
    acc = af.CovarianceAccumulator(520, compute_dtype=torch.float32)
    if not first:
        acc.update(torch.randn(3, 520, 7, 7, generator=gen))
    before = acc.state_dict()
    y = torch.randn(16, 520, 7, 7, generator=gen)
    y[-1, 519, -1, -1] = float("nan")  # the last channel: the last rows' worker's own
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(y)
    after = acc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("channels", [64, 300, 520])
def test_same_result_whoever_runs_which_task(gen, channels, threads):
    # The narrow and wide float32 paths and the fold hand out tasks to whichever worker is
    # free; a busy thread beside them changes who runs what, never the bits of the result.
    import threading

    y = torch.randn(24, channels, 20, 20, generator=gen) + 3.0
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            sum(range(1000))

    def run():
        acc = af.CovarianceAccumulator(channels, compute_dtype=torch.float32)
        for part in y.split(8):
            acc.update(part)
        return acc.comoment, acc.mean

    first = run()
    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        again = [run() for _ in range(4)]
    finally:
        stop.set()
        spinner.join()
    for m2, mean in again:
        assert torch.equal(m2, first[0]) and torch.equal(mean, first[1])

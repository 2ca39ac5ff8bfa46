"""Seeded random sweeps of the numerics against plain float64 references: the
accumulator over random shapes, dtypes, layouts, batch splits and offsets; AFIE and the
leave-one-out spectra over random spectra with ties, zeros and a huge dynamic range."""
import math

import numpy as np
import pytest
import torch

import afie_fast as af
from afie_fast import _ext
import reference

CASES = 60


def random_batch(rng, c, dtype, layout):
    n, h, w = (int(v) for v in rng.integers(1, 6, size=3))
    offset = rng.choice([0.0, 3.0, -50.0, 1e3]) * rng.normal(size=(1, c, 1, 1))
    scale = rng.uniform(0.01, 10.0, size=(1, c, 1, 1))
    y = torch.from_numpy(offset + scale * rng.normal(size=(n, c, h, w))).to(dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # a strided view: every other channel of a wider tensor
        wide = torch.zeros(n, 2 * c, h, w, dtype=dtype)
        wide[:, ::2] = y
        y = wide[:, ::2]
    return y


@pytest.mark.parametrize("case", range(CASES))
def test_accumulator_matches_float64_covariance(case):
    rng = np.random.default_rng(1000 + case)
    c = int(rng.choice([1, 2, 3, 8, 17, 64, 130]))
    dtype = [torch.float64, torch.float32, torch.float16, torch.bfloat16][case % 4]
    layout = ["contiguous", "channels_last", "sliced"][case % 3]
    compute = torch.float32 if case % 2 else None
    batches = [random_batch(rng, c, dtype, layout) for _ in range(int(rng.integers(1, 5)))]
    acc = af.CovarianceAccumulator(c, compute_dtype=compute)
    # the same data, split into two accumulators at a random batch and merged
    cut = int(rng.integers(0, len(batches) + 1))
    other = af.CovarianceAccumulator(c, compute_dtype=compute)
    for i, y in enumerate(batches):
        (acc if i < cut else other).update(y)
    acc.merge(other)
    x = np.concatenate([y.double().permute(1, 0, 2, 3).reshape(c, -1).numpy() for y in batches], axis=1)
    assert acc.count == x.shape[1]
    np.testing.assert_allclose(acc.mean.numpy(), x.mean(axis=1), rtol=0, atol=1e-5 * np.abs(x).max())
    if x.shape[1] < 2:
        return
    ref = np.atleast_2d(np.cov(x))
    products32 = compute is not None and dtype != torch.float64
    tol = (1e-4 if products32 else 1e-10) * np.abs(ref).max() + 1e-12
    np.testing.assert_allclose(acc.covariance().numpy(), ref, rtol=0, atol=tol)


def random_spectrum(rng):
    p = int(rng.integers(1, 200))
    kind = rng.integers(0, 5)
    if kind == 0:  # ties
        s = rng.choice([0.0, 1.0, 2.5], size=p)
    elif kind == 1:  # zeros and a few values
        s = np.where(rng.random(p) < 0.7, 0.0, rng.exponential(size=p))
    elif kind == 2:  # huge dynamic range
        s = 10.0 ** rng.uniform(-300, 300, size=p)
    elif kind == 3:  # flat up to rounding
        s = np.full(p, 3.0) * (1 + 1e-15 * rng.normal(size=p))
    else:
        s = rng.exponential(size=p) * rng.uniform(1e-6, 1e6)
    return np.abs(s)


@pytest.mark.parametrize("case", range(CASES))
def test_afie_matches_the_formula(case):
    rng = np.random.default_rng(2000 + case)
    s = random_spectrum(rng)
    c = len(s) + int(rng.integers(0, 5))
    k, afie = af.afie_from_spectrum(torch.from_numpy(s), n_filters=c)
    ref = reference.afie(s)[0]
    assert math.isfinite(k) and 0 <= k <= math.log(len(s)) + 1e-12
    assert k == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert afie == pytest.approx(ref / c, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("case", range(20))
def test_leave_one_out_matches_brute_force_on_random_spectra(case):
    rng = np.random.default_rng(3000 + case)
    c = int(rng.integers(2, 40))
    w = random_spectrum(rng)[:c]
    w = np.resize(w, c) if len(w) < c else w
    w = np.clip(w, 0, 1e6)  # eigenvalues of a covariance: non-negative, ties and zeros kept
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    a = (q * w) @ q.T
    a = (a + a.T) / 2
    wt, vt = _ext.eigh(torch.from_numpy(a[None]), vectors=True)
    out = _ext.leave_one_out(wt[0], vt[0]).numpy()
    scale = max(np.abs(a).max(), 1e-300)
    for j in range(c):
        keep = np.delete(np.arange(c), j)
        np.testing.assert_allclose(out[j], np.linalg.eigvalsh(a[np.ix_(keep, keep)]), rtol=0, atol=1e-9 * scale)

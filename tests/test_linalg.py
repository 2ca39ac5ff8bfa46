"""Eigensolves, singular values and leave-one-out spectra against numpy."""
import numpy as np
import pytest
import torch

from afie_fast import _ext


def random_spd(rng, c, repeats=False):
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    w = rng.uniform(0.1, 10.0, size=c)
    if repeats and c >= 4:
        w[: c // 3] = 2.5  # a multiple eigenvalue
        w[-2:] = 7.0
    return (q * w) @ q.T


def test_eigh_batched_matches_numpy(np_rng):
    a = np.stack([random_spd(np_rng, 17) for _ in range(5)])
    w, v = _ext.eigh(torch.from_numpy(a), vectors=True)
    np.testing.assert_allclose(w.numpy(), np.linalg.eigvalsh(a), rtol=1e-12, atol=1e-12)
    # eigenvectors are columns: A V = V diag(w)
    np.testing.assert_allclose(a @ v.numpy(), v.numpy() * w.numpy()[:, None, :], atol=1e-11)
    w_only, none = _ext.eigh(torch.from_numpy(a))
    assert none is None
    np.testing.assert_allclose(w_only.numpy(), w.numpy(), atol=1e-12)


def test_eigh_many_mixed_sizes_match_numpy(np_rng):
    sizes = [3, 40, 1, 17, 40, 120, 2]  # mixed, so the widest-first schedule reorders them
    mats = [random_spd(np_rng, c, repeats=True) for c in sizes]
    out = _ext.eigh_many([torch.from_numpy(a) for a in mats], vectors=True)
    for a, (w, v) in zip(mats, out):
        np.testing.assert_allclose(w.numpy(), np.linalg.eigvalsh(a), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a @ v.numpy(), v.numpy() * w.numpy(), atol=1e-11)


def test_eigh_many_single_precision_stays_under_the_float32_floor(np_rng):
    # score() zeroes eigenvalues under C·eps32·max for float32 products; a float32 solve
    # must move each eigenvalue by less than that floor.
    for c in (64, 300):
        x = np_rng.normal(size=(c, 3 * c)) * np_rng.uniform(0.01, 10, size=(c, 1))
        a = np.cov(x)
        (w, none), = _ext.eigh_many([torch.from_numpy(a)], single=True)
        ref = np.linalg.eigvalsh(a)
        assert none is None and w.dtype == torch.float64
        err = np.abs(w.numpy() - ref).max()
        assert 0 < err <= c * np.finfo(np.float32).eps * ref.max()
    with pytest.raises(ValueError, match="eigenvalues only"):
        _ext.eigh_many([torch.eye(3, dtype=torch.float64)], vectors=True, single=True)


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (1, 5), (30, 30)])
def test_singular_values_match_numpy(np_rng, shape):
    m = np_rng.normal(size=shape)
    s = _ext.singular_values(torch.from_numpy(m))
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(m, compute_uv=False), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("c", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("repeats", [False, True])
def test_leave_one_out_matches_brute_force(np_rng, c, repeats):
    a = random_spd(np_rng, c, repeats)
    w, v = _ext.eigh(torch.from_numpy(a[None]), vectors=True)
    out = _ext.leave_one_out(w[0], v[0]).numpy()
    assert out.shape == (c, c - 1)
    scale = np.abs(a).max()
    rows = range(c) if c <= 64 else np_rng.choice(c, size=24, replace=False)
    for j in rows:
        keep = np.delete(np.arange(c), j)
        ref = np.linalg.eigvalsh(a[np.ix_(keep, keep)])
        np.testing.assert_allclose(out[j], ref, rtol=0, atol=1e-10 * scale)


def test_leave_one_out_deflation_and_indefinite(np_rng):
    # A block-diagonal matrix makes many eigenvector components exactly zero, and a
    # negative eigenvalue checks that nothing assumes a PSD input.
    c = 12
    a = np.zeros((c, c))
    a[:6, :6] = random_spd(np_rng, 6)
    a[6:, 6:] = random_spd(np_rng, 6, repeats=True) - 3.0 * np.eye(6)
    w, v = _ext.eigh(torch.from_numpy(a[None]), vectors=True)
    out = _ext.leave_one_out(w[0], v[0]).numpy()
    for j in range(c):
        keep = np.delete(np.arange(c), j)
        np.testing.assert_allclose(out[j], np.linalg.eigvalsh(a[np.ix_(keep, keep)]), atol=1e-10 * np.abs(a).max())


@pytest.mark.parametrize("c, k, dependent, dead", [(40, 12, False, True), (40, 12, True, True), (40, 12, True, False),
                                                   (13, 13, False, True), (9, 1, False, False), (300, 64, False, False),
                                                   (300, 64, False, True)])
def test_congruence_matches_numpy(np_rng, c, k, dependent, dead):
    """W A Wᵀ in full, and reduced: a K×K matrix with its eigenvalues but for c − k zeros,
    and its diagonal; for a positive definite A (Cholesky), a singular one (a dead input
    channel: the pivoted Cholesky), and W's columns dependent (an unused input channel,
    two equal ones)."""
    x = np_rng.normal(size=(3 * k, k))
    if dead:
        x[:, 0] = 0.0
    a = np.cov(x, rowvar=False).reshape(k, k)
    w = np_rng.normal(size=(c, k))
    if dependent:
        w[:, 2] = 0.0
        w[:, 5] = w[:, 7]
    full = w @ a @ w.T
    out = _ext.congruence(torch.from_numpy(a), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(out, full, rtol=0, atol=1e-12 * np.abs(full).max())
    assert np.array_equal(out, out.T)
    e = np.linalg.eigvalsh(full)
    np.testing.assert_allclose(e[:c - k], 0.0, atol=1e-12 * e.max())
    # The diagonal always to float64's rounding; the reduced matrix's spectrum too, or, with
    # single (XᵀX formed in float32), to float32's (ε₃₂ ≈ 1.2e-7, times a few for the sums).
    for single, tol in ((False, 1e-12), (True, 2e-6)):
        pair = (torch.from_numpy(a), torch.from_numpy(w))
        [(m, d)] = [(m.numpy(), d.numpy()) for m, d in _ext.congruence_reduced([pair], single=single)]
        assert m.shape == (k, k) and np.array_equal(m, m.T)
        np.testing.assert_allclose(d, np.diag(full), rtol=1e-12, atol=1e-14 * np.abs(full).max())
        np.testing.assert_allclose(np.linalg.eigvalsh(m), e[c - k:], rtol=0, atol=tol * e.max())


def test_congruence_reduced_refuses_a_wide_w():
    with pytest.raises(ValueError, match=r"w\[1\]: expected a \(C, 5\) matrix with C >= 5"):
        _ext.congruence_reduced([(torch.eye(5, dtype=torch.float64), torch.ones(6, 5, dtype=torch.float64)),
                                 (torch.eye(5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64))])


def test_congruence_reduced_many_at_once_equal_each_alone(np_rng):
    """One call over mixed sizes (the costliest first over the threads) gives each job's own result."""
    pairs = []
    for c, k in [(30, 4), (64, 32), (9, 9), (120, 40), (17, 2)]:
        x = np_rng.normal(size=(2 * k + 3, k))
        pairs.append((torch.from_numpy(np.cov(x, rowvar=False).reshape(k, k)), torch.from_numpy(np_rng.normal(size=(c, k)))))
    for single in (False, True):
        together = _ext.congruence_reduced(pairs, single)
        for pair, (m, d) in zip(pairs, together):
            [(m1, d1)] = _ext.congruence_reduced([pair], single)
            assert torch.equal(m, m1) and torch.equal(d, d1)

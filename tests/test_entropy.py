"""AFIE of a spectrum against the DESIGN §2 formula written plainly in numpy."""
import math

import pytest
import torch

import afie_fast as af
import reference


@pytest.mark.parametrize("p", [2, 3, 16, 512])
def test_matches_formula(np_rng, p):
    s = np_rng.gamma(2.0, size=p) * 10
    k, afie = af.afie_from_spectrum(torch.from_numpy(s), n_filters=p + 5)
    k_ref, afie_ref = reference.afie(s, p + 5)
    assert k == pytest.approx(k_ref, rel=1e-13)
    assert afie == pytest.approx(afie_ref, rel=1e-13)


@pytest.mark.parametrize("s", [[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0], [5.0]])
def test_flat_and_single_value_spectra(s):
    k, afie = af.afie_from_spectrum(s)
    assert k == pytest.approx(math.log(len(s)), abs=1e-15)
    assert afie == pytest.approx(math.log(len(s)) / len(s), abs=1e-15)


def test_entropy_stays_near_ln_p(np_rng):
    # After min-max and softmax, K can only lie within ~0.12 nats below ln p.
    for p in (4, 64, 1024):
        k, _ = af.afie_from_spectrum(np_rng.exponential(size=p))
        assert math.log(p) - 0.13 < k <= math.log(p)


def test_bad_spectra():
    with pytest.raises(ValueError, match="empty"):
        af.afie_from_spectrum([])
    with pytest.raises(ValueError, match="NaN or Inf"):
        af.afie_from_spectrum([1.0, float("nan")])
    with pytest.raises(ValueError, match="n_filters"):
        af.afie_from_spectrum([1.0, 2.0], n_filters=0)

"""Every bad input to the low-level API is a clear error naming the culprit."""
import re

import numpy as np
import pytest
import torch

import afie_fast as af


def test_wrong_channel_count(gen):
    acc = af.CovarianceAccumulator(4)
    with pytest.raises(ValueError, match="5 channels, the accumulator 4"):
        acc.update(torch.randn(2, 5, 3, 3, generator=gen))


@pytest.mark.parametrize("shape", [(4,), (2, 4, 3, 3, 1, 2)])
def test_wrong_ndim(gen, shape):
    # (N, C) up to (N, C, D, H, W) are batches; fewer or more axes are not.
    with pytest.raises(ValueError, match=re.escape(f"up to 3 position axes, got shape {shape}")):
        af.CovarianceAccumulator(4).update(torch.randn(shape, generator=gen))


def test_integer_dtype():
    with pytest.raises(TypeError, match="int64 is not supported"):
        af.CovarianceAccumulator(4).update(torch.ones(2, 4, 3, 3, dtype=torch.int64))


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        af.CovarianceAccumulator(4).update(torch.ones(0, 4, 3, 3))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        af.CovarianceAccumulator(4).update([[1.0, 2.0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_batch_rejected_state_unchanged(gen, bad):
    acc = af.CovarianceAccumulator(3).update(torch.randn(4, 3, 2, 2, generator=gen))
    before = acc.state_dict()
    y = torch.randn(4, 3, 2, 2, generator=gen)
    y[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(y)
    after = acc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_mismatches(gen):
    a = af.CovarianceAccumulator(4)
    with pytest.raises(ValueError, match="4 and 5 channels"):
        a.merge(af.CovarianceAccumulator(5))
    with pytest.raises(TypeError, match="float32"):
        a.merge(af.CovarianceAccumulator(4, dtype=torch.float32))
    with pytest.raises(TypeError, match="CovarianceAccumulator"):
        a.merge("not an accumulator")


def test_covariance_needs_two_observations(gen):
    acc = af.CovarianceAccumulator(2)
    with pytest.raises(ValueError, match="at least 2 observations"):
        acc.covariance()
    acc.update(torch.randn(1, 2, 1, 1, generator=gen))
    with pytest.raises(ValueError, match="has 1"):
        acc.covariance()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="channels"):
        af.CovarianceAccumulator(0)
    with pytest.raises(TypeError, match="dtype"):
        af.CovarianceAccumulator(3, dtype=torch.int32)


def test_low_level_mismatched_dtypes_and_shapes():
    from afie_fast import _ext

    y = np.zeros((2, 3, 1, 1))
    with pytest.raises(TypeError, match="m2: expected dtype float64, got float32"):
        _ext._C.comoments_update(y, np.zeros(1), np.zeros(3), np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"m2: expected shape \(3, 3\), got \(3, 4\)"):
        _ext._C.comoments_update(y, np.zeros(1), np.zeros(3), np.zeros((3, 4)))
    with pytest.raises(TypeError, match="y: expected a tensor or array"):
        _ext._C.comoments_update("y", np.zeros(1), np.zeros(3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="eigenvalues must be finite and ascending"):
        _ext._C.leave_one_out(np.array([2.0, 1.0]), np.eye(2), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="square"):
        _ext.eigh(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"a\[1\]: expected a square"):
        _ext._C.eigh([np.eye(2), np.zeros((2, 3))], [np.zeros(2), np.zeros(2)])
    with pytest.raises(TypeError, match=r"a\[0\]: expected dtype float64"):
        _ext._C.eigh([np.eye(2, dtype=np.float32)], [np.zeros(2)])
    with pytest.raises(ValueError, match="same length"):
        _ext._C.eigh([np.eye(2)], [])


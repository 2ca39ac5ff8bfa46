import numpy as np
import pytest
import torch


@pytest.fixture
def gen():
    """A torch generator with a fixed seed: fresh random inputs every test, reproducibly."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def np_rng():
    return np.random.default_rng(1234)

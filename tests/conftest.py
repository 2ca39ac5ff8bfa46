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


def import_torchvision():
    """torchvision, or a skip where it is not installed.

    The torchvision 0.28 wheel on PyPI is a CUDA build: beside the CPU torch of this
    project's machines, its import fails while registering fake (meta) kernels for its
    detection ops (``operator torchvision::nms does not exist``: the compiled ops it would
    describe are not loaded). The classification models are pure Python, so the import
    skips those registrations for ops that do not exist, and restores torch afterwards.
    """
    real = torch.library.register_fake

    def exists(op):
        namespace, _, name = op.partition("::")
        try:
            getattr(getattr(torch.ops, namespace), name.split(".")[0])
            return True
        except (AttributeError, RuntimeError):
            return False

    def register_fake(op, func=None, /, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::") and not exists(op):
            return (lambda f: f) if func is None else func
        return real(op, func, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        return pytest.importorskip("torchvision", reason="torchvision is installed by the README's test command")
    finally:
        torch.library.register_fake = real


def import_timm():
    """timm (installed with the test extras), imported through the torchvision shim."""
    import_torchvision()
    import timm

    return timm

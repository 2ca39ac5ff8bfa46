"""What the installed build is: version, backend, lean import."""
import os
import subprocess
import sys

import pytest

import afie_fast as af
from afie_fast import _ext


def test_version_single_sourced():
    assert af.__version__ == _ext._C.__version__


def test_core_is_installed_not_the_source_tree():
    assert os.path.exists(_ext._C.__file__)


def test_backend_info():
    info = af.backend_info()
    assert info["version"] == af.__version__
    assert info["blas"] == "scipy-openblas32" and "OpenBLAS" in info["blas_config"]
    assert info["blas_threads"] >= 1
    assert isinstance(info["cuda_compiled"], bool)
    if not info["cuda_compiled"]:
        assert info["cuda_device_present"] is False


@pytest.mark.skipif(os.environ.get("AFIE_EXPECT_CUDA") != "1", reason="set AFIE_EXPECT_CUDA=1 where nvcc built the package")
def test_cuda_kernels_compiled_in():
    # .ci/run builds with nvcc on PATH and sets AFIE_EXPECT_CUDA=1: the kernels must be in _C,
    # and on a machine without a GPU the backend must say so rather than fail.
    assert _ext._C.cuda_compiled
    info = af.backend_info()
    assert info["cuda_compiled"] is True
    assert info["cuda_device_present"] == (_ext._C.cuda_device_count() > 0)


@pytest.mark.skipif(os.environ.get("AFIE_EXPECT_OPENMP") is None, reason="set AFIE_EXPECT_OPENMP=1 or 0 to say how the core was built")
def test_parallel_backend_as_built():
    # .ci/run tests the OpenMP build and a build without it (std::thread workers), so
    # each run must be on the build it thinks it is on.
    assert af.backend_info()["openmp"] is (os.environ["AFIE_EXPECT_OPENMP"] == "1")


def test_import_does_not_initialise_cuda(tmp_path):
    # cwd elsewhere: `python -c` puts the cwd first on sys.path, and the source tree has no _C.
    code = "import torch, afie_fast; afie_fast.backend_info(); print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_core_does_not_link_libtorch():
    with open(_ext._C.__file__, "rb") as f:
        blob = f.read()
    assert b"libtorch" not in blob and b"libc10" not in blob

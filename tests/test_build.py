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
    # The tests must exercise the installed package: a source folder on sys.path ahead of
    # it would hide a broken install (and it has no _C).
    source_tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package_dir = os.path.dirname(os.path.abspath(af.__file__))
    assert os.path.dirname(os.path.abspath(_ext._C.__file__)) == package_dir
    assert not package_dir.startswith(os.path.join(source_tree, "afie_fast"))


def test_backend_info():
    info = af.backend_info()
    assert info["version"] == af.__version__
    assert info["blas"] == "scipy-openblas32" and "OpenBLAS" in info["blas_config"]
    assert info["blas_threads"] >= 1
    assert info["cuda_setting"] in ("AUTO", "ON", "OFF")
    # The CMake that built it: the pinned PyPI one (pyproject's cmake.version) or newer.
    major, minor = (int(v) for v in info["cmake"].split(".")[:2])
    assert (major, minor) >= (3, 31), info["cmake"]
    if info["cuda_compiled"]:
        assert info["cuda_reason"] is None
    else:
        assert info["cuda_device_present"] is False
        assert isinstance(info["cuda_reason"], str) and info["cuda_reason"], "a CPU-only build must say why"


@pytest.mark.skipif(os.environ.get("AFIE_EXPECT_CUDA") not in ("0", "1"),
                    reason="set AFIE_EXPECT_CUDA=1 (or 0) where the build should (not) have the CUDA kernels")
def test_cuda_kernels_as_expected():
    # .ci/run builds with nvcc on PATH (AFIE_EXPECT_CUDA=1: the kernels must be in, and on a
    # machine without a GPU the backend must say so rather than fail) and with a broken
    # nvcc (=0: AUTO fell back to the CPU core and says why).
    info = af.backend_info()
    if os.environ["AFIE_EXPECT_CUDA"] == "1":
        assert _ext._C.cuda_compiled is True and info["cuda_compiled"] is True
        assert info["cuda_device_present"] == (_ext._C.cuda_device_count() > 0)
    else:
        assert info["cuda_compiled"] is False
        assert info["cuda_reason"], "AUTO fell back without a reason"
        print("cuda_reason:", info["cuda_reason"])


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

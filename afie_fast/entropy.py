"""AFIE of one spectrum and what the compiled backend offers."""
from __future__ import annotations

import platform
from typing import Any, Sequence

import torch

from . import _ext


def afie_from_spectrum(s: torch.Tensor | Sequence[float], n_filters: int | None = None) -> tuple[float, float]:
    """Entropy K and AFIE = K / n_filters of a spectrum (DESIGN §2).

    The spectrum s (p non-negative values, any order) is min-max normalised, passed
    through a softmax, and K = −Σ q ln q (natural log). A flat or all-zero spectrum
    gives K = ln p. ``n_filters`` defaults to p.
    """
    s = torch.as_tensor(s, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("s: the spectrum is empty")
    n_filters = s.numel() if n_filters is None else n_filters
    if not isinstance(n_filters, int) or n_filters < 1:
        raise ValueError(f"n_filters must be a positive int, got {n_filters!r}")
    k = _ext.spectrum_entropy(s)
    return k, k / n_filters


def backend_info() -> dict[str, Any]:
    """What the compiled core was built with and what it finds at run time.

    Never initialises CUDA unless the core was built with CUDA kernels; then it only asks
    the CUDA runtime how many devices exist.
    """
    c = _ext._C
    blas = c.blas_info()
    return {
        "version": c.__version__,
        "blas": blas["name"],
        "blas_config": blas["config"],
        "blas_threads": blas["threads"],
        "comoment_kernel": c.gram_kernel(),  # avx512, avx2 (AFIE_GRAM_KERNEL=avx2 forces it) or none
        "openmp": bool(c.openmp),
        "torch_threads": torch.get_num_threads(),
        "cuda_compiled": bool(c.cuda_compiled),
        "cuda_device_present": bool(c.cuda_compiled) and c.cuda_device_count() > 0,
        "cuda_setting": c.cuda_setting,
        "cuda_reason": c.cuda_reason or None,
        "cmake": c.cmake_version,
        "compiler": c.compiler,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }

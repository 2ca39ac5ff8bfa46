"""The one module that talks to the compiled core ``afie_fast._C``.

Tensors cross as zero-copy DLPack buffers; this module allocates every output with
torch's allocator and passes the caller's thread count and CUDA stream along.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch.utils.dlpack import to_dlpack

try:  # Make libscipy_openblas.so findable even when _C's rpath does not reach it.
    import scipy_openblas32 as _openblas

    ctypes.CDLL(os.path.join(_openblas.get_lib_dir(), _openblas.get_library(fullname=True)), mode=ctypes.RTLD_GLOBAL)
except (ImportError, OSError):  # the rpath may still find it; _C's import says if not
    pass

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"afie_fast's compiled core could not be loaded ({exc}). Install the package with "
        "`pip install .` and do not run Python from a source checkout whose afie_fast/ "
        f"folder lacks _C (this one is {os.path.dirname(__file__)})."
    ) from exc

__all__ = ["_C", "threads", "comoments_update", "comoments_merge", "eigh", "eigh_many", "singular_values",
           "leave_one_out", "congruence", "congruence_reduced",
           "spectrum_entropy", "gram_upper_add"]


def threads() -> int:
    """Threads the core may use: torch's, so the two libraries never oversubscribe."""
    return torch.get_num_threads()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def comoments_update(y: torch.Tensor, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                     scratch: torch.Tensor | None = None, rejected: torch.Tensor | None = None,
                     float_products: bool = False) -> None:
    """Add y (N, C, H, W) to the state (n, mean, m2) in place. CUDA states also pass their
    scratch (C + 2,) float64 and rejected (1,) int32 buffers."""
    # Called once per layer and batch: the tensors cross as DLPack capsules made in C
    # (torch's Tensor.__dlpack__ costs microseconds of Python each).
    args = [to_dlpack(t) for t in (y.detach(), n, mean, m2)]
    if not y.is_cuda:
        _C.comoments_update(*args, threads(), 0, scratch, rejected, float_products)
        return
    work = None
    if mean.dtype == torch.float32 and _C.cuda_compiled and y.dim() == 4 and y.shape[1] > 0:
        # The batch, centred, as dense float32 for the tensor cores (stream-ordered, from torch's pool).
        floats = _C.cuda_workspace_floats(y.shape[1], y.numel() // y.shape[1])
        work = to_dlpack(torch.empty(floats, dtype=torch.float32, device=y.device))
    extra = [None if t is None else to_dlpack(t) for t in (scratch, rejected)]
    # Launch on the tensor's own device and its current stream (switching costs, so only when needed).
    here = y.device.index == torch.cuda.current_device()
    with contextlib.nullcontext() if here else torch.cuda.device(y.device):
        _C.comoments_update(*args, threads(), _stream(y), *extra, False, work)


def comoments_merge(a: tuple, b: tuple, scratch: torch.Tensor | None = None) -> None:
    """Merge state b = (n, mean, m2) into state a in place (same device)."""
    if a[1].is_cuda:
        with torch.cuda.device(a[1].device):
            _C.comoments_merge(*a, *b, _stream(a[1]), scratch)
    else:
        _C.comoments_merge(*a, *b, 0, scratch)


def eigh(a: torch.Tensor, vectors: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues (ascending) and optionally eigenvectors of symmetric a (..., C, C), float64 CPU."""
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a: expected square matrices (..., C, C), got shape {tuple(a.shape)}")
    batch, c = a.shape[:-2], a.shape[-1]
    mats = list(a.detach().to(torch.float64).reshape(-1, c, c).contiguous().unbind())
    pairs = eigh_many(mats, vectors)
    w = torch.stack([p[0] for p in pairs]) if pairs else torch.empty(0, c, dtype=torch.float64)
    v = (torch.stack([p[1] for p in pairs]) if pairs else torch.empty(0, c, c, dtype=torch.float64)) if vectors else None
    return w.reshape(*batch, c), (v.reshape(*batch, c, c) if vectors else None)


def eigh_many(mats: list[torch.Tensor], vectors: bool = False,
              single: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Eigenpairs of symmetric float64 CPU matrices of any sizes in one call, widest first over
    the threads. single: eigenvalues in float32 arithmetic (about twice as fast on wide
    matrices, ~1e-5 of the largest eigenvalue); not with vectors."""
    if single and vectors:
        raise ValueError("eigh_many: single precision is for eigenvalues only")
    mats = [m.detach().to("cpu", torch.float64).contiguous() for m in mats]
    ws = [torch.empty(m.shape[-1], dtype=torch.float64) for m in mats]
    vs = [torch.empty_like(m) for m in mats] if vectors else None
    _C.eigh(mats, ws, vs, threads(), single)
    return [(w, vs[i] if vectors else None) for i, w in enumerate(ws)]


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a 2-D matrix, float64."""
    m = m.detach().to(torch.float64).contiguous()
    s = torch.empty(min(m.shape), dtype=torch.float64)
    _C.singular_values(m, s, threads())
    return s


def leave_one_out(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (C, C-1) of every principal submatrix of V diag(w) Vᵀ."""
    c = w.shape[0]
    out = torch.empty(c, max(c - 1, 0), dtype=torch.float64)
    _C.leave_one_out(w.contiguous(), v.contiguous(), out, threads())
    return out


def congruence(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W A Wᵀ (C, C) for a symmetric a (K, K) and w (C, K), float64 on the CPU."""
    a, w = (t.detach().to("cpu", torch.float64).contiguous() for t in (a, w))
    out = torch.empty(w.shape[0], w.shape[0], dtype=torch.float64)
    _C.congruence(a, w, out, threads())
    return out


def congruence_reduced(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                       single: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (a (K, K) symmetric, w (C, K)), C ≥ K: (XᵀX (K, K), diag(W A Wᵀ) (C,)) with
    X = W L, A = L Lᵀ; the first has the eigenvalues of W A Wᵀ but for C − K zeros. float64
    CPU, all pairs in one call, the costliest first over the threads. ``single``: XᵀX
    formed in float32, for a float32 eigensolve (X and the diagonal stay float64)."""
    pairs = [tuple(t.detach().to("cpu", torch.float64).contiguous() for t in p) for p in pairs]
    ms = [torch.empty(a.shape[0], a.shape[0], dtype=torch.float64) for a, _ in pairs]
    ds = [torch.empty(w.shape[0], dtype=torch.float64) for _, w in pairs]
    _C.congruence_reduced([a for a, _ in pairs], [w for _, w in pairs], ms, ds, single, threads())
    return list(zip(ms, ds))


def spectrum_entropy(s: torch.Tensor) -> float:
    """AFIE's entropy K of a spectrum (DESIGN §2)."""
    return _C.spectrum_entropy(s.detach().to(torch.float64).contiguous())


def gram_upper_add(a: torch.Tensor, c: torch.Tensor) -> None:
    """c += the upper triangle of a[:n]·a[:n]ᵀ in place (c [n, n] float64; a float32, rows
    padded with zeros to a multiple of 24, row length a multiple of 16): the co-moment
    kernel alone, on the calling thread (``_C.gram_kernel()`` says which)."""
    _C.gram_upper_add(a, c)

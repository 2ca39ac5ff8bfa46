"""The core's two kernels against the torch code a user would otherwise write.

1. Accumulate: the co-moment of one batch of conv outputs (N, C, H, W) float32 into a
   float64 state. afie_fast: its AVX2/FMA co-moment kernel (NCHW float32 products under
   1024 channels, csrc/gram.cpp) or one OpenBLAS SYRK (symmetric half) straight from the
   strided batch (channels_last, float64 products, wider layers, CPUs without AVX2).
   torch: permute to (C, N·H·W), centre, float32 x @ x.T, float64 Chan merge.
2. Eigensolve: the C×C covariance of each VGG-16 layer, afie_fast (LAPACK dsyevd) vs
   torch.linalg.eigvalsh, float64.
3. The co-moment kernel alone, one thread: csrc/gram.cpp's upper triangle of A·Aᵀ for a
   centred chunk A of C channels × 512 observations, against torch's SGEMM of the same
   A @ A.T, interleaved in rounds. "useful": the C(C+1)/2 products of a triangle, what
   either needs; SGEMM also computes the other half, so its own rate is twice its
   useful one.

    python benchmarks/bench_core.py      # 2 threads (1 for the kernel table), medians of 7
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import afie_fast as af  # noqa: E402
from afie_fast import _ext  # noqa: E402
from _timing import interleaved, median_time, table  # noqa: E402

# VGG-16 on CIFAR (32×32), batch 64: (channels, spatial side) of its conv stages.
SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]


class TorchAccumulator:
    """The straightforward torch path: float32 GEMM per batch, float64 merge."""

    def __init__(self, c: int) -> None:
        self.n, self.mean, self.m2 = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)

    def update(self, y: torch.Tensor) -> None:
        f = y.permute(1, 0, 2, 3).reshape(y.shape[1], -1)
        mb = f.mean(1, keepdim=True)
        xc = f - mb
        m2b = (xc @ xc.T).double()
        nb = f.shape[1]
        n = self.n + nb
        delta = mb.squeeze(1).double() - self.mean
        self.m2 += m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n


def kernel_rates(g: torch.Generator, ld: int = 512, rounds: int = 15) -> str:
    """Section 3: GMAC/s of the kernel and of SGEMM, one thread, medians of interleaved rounds."""
    torch.set_num_threads(1)
    rows = []
    for c in (64, 128, 256, 512, 768, 1024):
        a = torch.zeros(-(-c // 24) * 24, ld)
        a[:c] = torch.randn(c, ld, generator=g)
        x = a[:c].clone()
        out = torch.zeros(c, c, dtype=torch.float64)
        t = interleaved({"kernel": lambda: _ext.gram_upper_add(a, out), "sgemm": lambda: x @ x.T}, rounds)
        useful = c * (c + 1) / 2 * ld
        k, s = statistics.median(t["kernel"]), statistics.median(t["sgemm"])
        rows.append([f"C={c}, {ld} observations", f"{useful / k / 1e9:.1f}", f"{useful / s / 1e9:.1f}",
                     f"{c * c * ld / s / 1e9:.1f}", f"{s / k:.2f}×"])
    torch.set_num_threads(2)
    return table(["chunk", f"kernel ({_ext._C.gram_kernel()}) useful GMAC/s", "SGEMM useful GMAC/s",
                  "SGEMM own GMAC/s", "kernel speed-up"], rows)


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    rows = []
    for c, side in SHAPES:
        y = torch.randn(64, c, side, side, generator=g)
        ref = TorchAccumulator(c)
        t_ref = median_time(lambda: ref.update(y), repeats=7)
        flops = c * (c + 1) * y.shape[0] * side * side  # the symmetric half, multiply + add
        for label, compute in (("fp32 products", torch.float32), ("fp64 products", torch.float64)):
            ours = af.CovarianceAccumulator(c, compute_dtype=compute)
            t_ours = median_time(lambda: ours.update(y), repeats=7)
            rows.append([f"accumulate C={c}, {side}×{side}, N=64, {label}", f"{t_ours * 1e3:.2f}",
                         f"{flops / t_ours / 1e9:.1f}", f"{t_ref * 1e3:.2f}", f"{t_ref / t_ours:.2f}×"])
    for c in sorted({c for c, _ in SHAPES}):
        a = torch.randn(c, 4 * c, generator=g, dtype=torch.float64)
        cov = (a @ a.T / (4 * c))[None]
        t_ours = median_time(lambda: _ext.eigh(cov), repeats=7)
        t_ref = median_time(lambda: torch.linalg.eigvalsh(cov), repeats=7)
        rows.append([f"eigenvalues C={c}", f"{t_ours * 1e3:.2f}", "", f"{t_ref * 1e3:.2f}", f"{t_ref / t_ours:.2f}×"])
    covs = torch.stack([torch.eye(64, dtype=torch.float64) + 0.01 * torch.randn(64, 64, generator=g, dtype=torch.float64)
                        for _ in range(16)])
    covs = covs @ covs.mT
    t_ours = median_time(lambda: _ext.eigh(covs), repeats=7)
    t_ref = median_time(lambda: torch.linalg.eigvalsh(covs), repeats=7)
    rows.append(["eigenvalues 16 × C=64 (batched)", f"{t_ours * 1e3:.2f}", "", f"{t_ref * 1e3:.2f}", f"{t_ref / t_ours:.2f}×"])
    print(f"afie_fast {af.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{af.backend_info()['blas_config']}")
    print(table(["operation", "afie_fast ms", "afie_fast GFLOP/s", "torch ms", "speed-up"], rows))
    print("\nThe co-moment kernel alone, one thread (section 3):")
    print(kernel_rates(g))


if __name__ == "__main__":
    main()

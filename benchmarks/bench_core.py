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
4. A widening 1×1 conv's spectrum from its input's covariance A (K×K) and weight W (C×K),
   one thread, on ResNet-50's shapes: afie_fast's reduced congruence (X = W L, A = L Lᵀ;
   XᵀX, K×K, formed in float32 for score()'s float32 eigensolve or in float64) and that
   eigensolve, against torch.linalg.eigvalsh(W @ A @ W.T), the C×C matrix a user would
   form, float64. Interleaved rounds, medians.

    python benchmarks/bench_core.py              # 2 threads (1 for sections 3-4), medians of 7
    python benchmarks/bench_core.py --section 4  # one section
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


def reduced_congruences(g: torch.Generator, rounds: int = 7) -> str:
    """Section 4: ms per widening layer, one thread, medians of interleaved rounds."""
    torch.set_num_threads(1)
    rows = []
    for c, k in ((2048, 1024), (2048, 512), (1024, 256), (256, 64)):  # ResNet-50's widening convs
        x = torch.randn(4 * k, k, generator=g, dtype=torch.float64)
        a, w = torch.cov(x.T), torch.randn(c, k, generator=g, dtype=torch.float64) / k ** 0.5

        def ours(single: bool):
            [(m, _)] = _ext.congruence_reduced([(a, w)], single=single)
            return _ext.eigh_many([m], single=single)

        t = interleaved({"f32": lambda: ours(True), "f64": lambda: ours(False),
                         "torch": lambda: torch.linalg.eigvalsh(w @ a @ w.T)}, rounds)
        f32, f64, ref = (statistics.median(t[key]) for key in ("f32", "f64", "torch"))
        rows.append([f"C={c} from K={k}", f"{f32 * 1e3:.1f}", f"{f64 * 1e3:.1f}", f"{ref * 1e3:.1f}",
                     f"{ref / f32:.1f}×"])
    torch.set_num_threads(2)
    return table(["widening layer", "afie_fast, float32 solve, ms", "afie_fast, float64, ms",
                  "torch eigvalsh(W A Wᵀ), ms", "speed-up (float32)"], rows)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", type=int, choices=(1, 3, 4), help="only this section (1 covers 1-2)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    if args.section == 3:
        return print(kernel_rates(g))
    if args.section == 4:
        return print(reduced_congruences(g))
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
    if args.section == 1:
        return
    print("\nThe co-moment kernel alone, one thread (section 3):")
    print(kernel_rates(g))
    print("\nA widening layer's spectrum from its input's covariance, one thread (section 4):")
    print(reduced_congruences(g))


if __name__ == "__main__":
    main()

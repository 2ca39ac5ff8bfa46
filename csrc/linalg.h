// Dense symmetric eigensolves and singular values on the host (LAPACK), and the
// leave-one-out spectra of a symmetric matrix from one eigendecomposition.
#pragma once
#include <cstdint>
#include <vector>

namespace afie {

// One symmetric eigenproblem: the C×C row-major matrix a (its lower triangle is read),
// eigenvalues w (ascending) and optionally eigenvectors v (v[:, i] is eigenvector i).
struct EighJob {
  int64_t C;
  const double* a;
  double* w;
  double* v;  // [C, C] or nullptr
};

// Solves every job, the widest first, on up to `threads` workers that each take the next
// job as they finish and call LAPACK single-threaded. single: solve in float32 (ssyevd),
// about twice as fast on wide matrices, eigenvalues within ~1e-5 of the largest: for
// covariances whose own entries carry float32 rounding.
void eigh_cpu(const std::vector<EighJob>& jobs, bool single, int threads);

// Singular values (descending) of an R×K row-major matrix.
void singular_values_cpu(int64_t R, int64_t K,
                         const double* m,  // [R, K]
                         double* s,        // [min(R, K)]
                         int threads);

// For a symmetric A = V diag(w) Vᵀ (w ascending), the eigenvalues (ascending) of each
// principal submatrix A_j (row and column j deleted), j = 0..C−1. They are the roots of
// Σ_i V_ji² / (w_i − μ) = 0, one in each gap between consecutive (deflated) poles, plus
// the eigenvalues that deflation keeps. O(C²) per j.
void leave_one_out_cpu(int64_t C,
                       const double* w,  // [C]
                       const double* v,  // [C, C]
                       double* out,      // [C, C − 1]
                       int threads);

// out = W A Wᵀ for a symmetric K×K row-major A and a C×K row-major W: the covariance of
// y = W x from the covariance A of x (exact; both triangles of out are written).
void congruence_cpu(int64_t C, int64_t K,
                    const double* a,  // [K, K]
                    const double* w,  // [C, K]
                    double* out,      // [C, C]
                    int threads);

// One reduced congruence, for C ≥ K: m = XᵀX (K×K) with X = W L, A = L Lᵀ (Cholesky,
// pivoted where A is semi-definite), whose eigenvalues are those of W A Wᵀ = X Xᵀ but for
// C − K zeros, and d = the diagonal of W A Wᵀ (X's squared row norms). An eigensolve of
// K×K in place of C×C: (C/K)³ less work. `single`: XᵀX formed in float32 (X and d stay
// float64), for a float32 eigensolve of covariances whose co-moments were float32 products.
struct CongruenceJob {
  int64_t C, K;
  const double* a;  // [K, K], symmetric
  const double* w;  // [C, K]
  double* m;        // [K, K]
  double* d;        // [C]
};

// Runs every job, the costliest first, on up to `threads` workers that each take the next
// job as they finish and call BLAS single-threaded (as eigh_cpu does).
void congruence_reduced_cpu(const std::vector<CongruenceJob>& jobs, bool single, int threads);

}  // namespace afie

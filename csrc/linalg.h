// Dense symmetric eigensolves and singular values on the host (LAPACK), and the
// leave-one-out spectra of a symmetric matrix from one eigendecomposition.
#pragma once
#include <cstdint>

namespace afie {

// Eigenvalues (ascending) of B symmetric C×C matrices, and optionally eigenvectors.
// a is read only (the lower triangle of each matrix, row-major, contiguous). Matrices are
// spread over `threads` workers, each calling LAPACK single-threaded.
void eigh_batched_cpu(int64_t B, int64_t C,
                      const double* a,  // [B, C, C]
                      double* w,        // [B, C]
                      double* v,        // [B, C, C] or nullptr; v[b, :, i] is eigenvector i
                      int threads);

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

}  // namespace afie

// The few BLAS/LAPACK routines the CPU core uses, from scipy-openblas32, whose symbols
// carry a prefix (BLAS_SYMBOL_PREFIX, "scipy_"). Declared here by hand because the
// wheel's lapack.h does not apply that prefix to its Fortran names.
#pragma once
#include <cstddef>

#ifndef BLAS_SYMBOL_PREFIX
#define BLAS_SYMBOL_PREFIX scipy_
#endif
#define AFIE_CAT2(a, b) a##b
#define AFIE_CAT(a, b) AFIE_CAT2(a, b)
#define AFIE_BLAS(name) AFIE_CAT(BLAS_SYMBOL_PREFIX, name)

extern "C" {
// Fortran interfaces: column-major, everything by pointer, hidden string lengths last.
void AFIE_BLAS(dsyrk_)(const char* uplo, const char* trans, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* beta,
                       double* c, const int* ldc, size_t, size_t);
void AFIE_BLAS(ssyrk_)(const char* uplo, const char* trans, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* beta,
                       float* c, const int* ldc, size_t, size_t);
void AFIE_BLAS(dgemm_)(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                       const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                       const int* ldc, size_t, size_t);
void AFIE_BLAS(sgemm_)(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc, size_t, size_t);
void AFIE_BLAS(dsyevd_)(const char* jobz, const char* uplo, const int* n, double* a,
                        const int* lda, double* w, double* work, const int* lwork, int* iwork,
                        const int* liwork, int* info, size_t, size_t);
void AFIE_BLAS(ssyevd_)(const char* jobz, const char* uplo, const int* n, float* a,
                        const int* lda, float* w, float* work, const int* lwork, int* iwork,
                        const int* liwork, int* info, size_t, size_t);
void AFIE_BLAS(dgesdd_)(const char* jobz, const int* m, const int* n, double* a, const int* lda,
                        double* s, double* u, const int* ldu, double* vt, const int* ldvt,
                        double* work, const int* lwork, int* iwork, int* info, size_t);
void AFIE_BLAS(dtrmm_)(const char* side, const char* uplo, const char* transa, const char* diag, const int* m,
                       const int* n, const double* alpha, const double* a, const int* lda, double* b, const int* ldb,
                       size_t, size_t, size_t, size_t);
void AFIE_BLAS(dpotrf_)(const char* uplo, const int* n, double* a, const int* lda, int* info, size_t);
void AFIE_BLAS(dpstrf_)(const char* uplo, const int* n, double* a, const int* lda, int* piv, int* rank,
                        const double* tol, double* work, int* info, size_t);
void AFIE_BLAS(openblas_set_num_threads)(int);
int AFIE_BLAS(openblas_get_num_threads)(void);
char* AFIE_BLAS(openblas_get_config)(void);
}

namespace afie::blas {

// OpenBLAS's pool is process-wide; set it only when it differs (setting is not free).
inline void use_threads(int threads) {
  if (threads > 0 && AFIE_BLAS(openblas_get_num_threads)() != threads)
    AFIE_BLAS(openblas_set_num_threads)(threads);
}

// Typed dispatch to the Fortran SYRK / GEMM (column-major, beta = 0).
inline void syrk(const char* trans, int n, int k, const double* a, int lda, double* c, int ldc) {
  const double one = 1.0, zero = 0.0;
  AFIE_BLAS(dsyrk_)("L", trans, &n, &k, &one, a, &lda, &zero, c, &ldc, 1, 1);
}
inline void syrk(const char* trans, int n, int k, const float* a, int lda, float* c, int ldc) {
  const float one = 1.0f, zero = 0.0f;
  AFIE_BLAS(ssyrk_)("L", trans, &n, &k, &one, a, &lda, &zero, c, &ldc, 1, 1);
}
inline void gemm(const char* ta, const char* tb, int m, int n, int k, const double* a, int lda, const double* b,
                 int ldb, double* c, int ldc) {
  const double one = 1.0, zero = 0.0;
  AFIE_BLAS(dgemm_)(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc, 1, 1);
}
inline void gemm(const char* ta, const char* tb, int m, int n, int k, const float* a, int lda, const float* b,
                 int ldb, float* c, int ldc) {
  const float one = 1.0f, zero = 0.0f;
  AFIE_BLAS(sgemm_)(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc, 1, 1);
}

// B := Lᵀ B for a column-major lower-triangular m×m L and m×n B (TRMM).
inline void trmm_lower_t(int m, int n, const double* l, double* b) {
  const double one = 1.0;
  AFIE_BLAS(dtrmm_)("L", "L", "T", "N", &m, &n, &one, l, &m, b, &m, 1, 1, 1, 1);
}

// Typed dispatch to the Fortran symmetric eigensolver (divide and conquer).
inline void syevd(const char* jobz, int n, double* a, double* w, double* work, int lwork, int* iwork, int liwork,
                  int* info) {
  AFIE_BLAS(dsyevd_)(jobz, "U", &n, a, &n, w, work, &lwork, iwork, &liwork, info, 1, 1);
}
inline void syevd(const char* jobz, int n, float* a, float* w, float* work, int lwork, int* iwork, int liwork,
                  int* info) {
  AFIE_BLAS(ssyevd_)(jobz, "U", &n, a, &n, w, work, &lwork, iwork, &liwork, info, 1, 1);
}

// Rows [i0, i0 + mi) × columns [j0, j0 + mj) (j0 ≥ i0) of the upper triangle of the
// row-major C = A·Aᵀ, where A is the chunk buffer: obs_major=false, [n, k] (one row per
// variable); true, [k, n] (one row per observation). Row-major upper is column-major
// lower, so the Fortran calls see everything transposed.
template <class T>
void syrk_block(bool obs_major, int n, int k, const T* a, T* c, int i0, int mi, int j0, int mj) {
  T* out = c + size_t(i0) * n + j0;
  if (i0 == j0) {
    if (obs_major) syrk("N", mi, k, a + i0, n, out, n);
    else syrk("T", mi, k, a + size_t(i0) * k, k, out, n);
  } else {
    if (obs_major) gemm("N", "T", mj, mi, k, a + j0, n, a + i0, n, out, n);
    else gemm("T", "N", mj, mi, k, a + size_t(j0) * k, k, a + size_t(i0) * k, k, out, n);
  }
}

}  // namespace afie::blas

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
void AFIE_BLAS(dsyevd_)(const char* jobz, const char* uplo, const int* n, double* a,
                        const int* lda, double* w, double* work, const int* lwork, int* iwork,
                        const int* liwork, int* info, size_t, size_t);
void AFIE_BLAS(dgesdd_)(const char* jobz, const int* m, const int* n, double* a, const int* lda,
                        double* s, double* u, const int* ldu, double* vt, const int* ldvt,
                        double* work, const int* lwork, int* iwork, int* info, size_t);
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

// C[upper] = A·Aᵀ (beta 0: C's old contents are never read) for a row-major A. obs_major=false: A is [n, k] (one row per
// variable); true: A is [k, n] (one row per observation). C is row-major [n, n].
// Row-major upper == column-major lower, so the Fortran call flips uplo and trans.
inline void syrk_upper(bool obs_major, int n, int k, const double* a, double* c) {
  const double one = 1.0, zero = 0.0;
  const int lda = obs_major ? n : k;
  AFIE_BLAS(dsyrk_)("L", obs_major ? "N" : "T", &n, &k, &one, a, &lda, &zero, c, &n, 1, 1);
}
inline void syrk_upper(bool obs_major, int n, int k, const float* a, float* c) {
  const float one = 1.0f, zero = 0.0f;
  const int lda = obs_major ? n : k;
  AFIE_BLAS(ssyrk_)("L", obs_major ? "N" : "T", &n, &k, &one, a, &lda, &zero, c, &n, 1, 1);
}

}  // namespace afie::blas

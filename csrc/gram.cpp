#include "gram.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AFIE_GRAM_X86 1
#endif

namespace afie {

#ifdef AFIE_GRAM_X86

bool gram_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

namespace {

// Sums of four 8-lane vectors, as one 4-lane vector.
__attribute__((target("avx2,fma"))) inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// A 3×Q tile that crosses the diagonal, the last column or i_end: only its entries in the
// upper triangle, the matrix and the caller's rows are added to c.
template <int R, int Q>
void add_edge_tile(const float (&tile)[R][Q], double* c, int64_t n, int64_t i0, int64_t j0, int64_t i_end) {
  for (int64_t r = 0; r < R && i0 + r < i_end; ++r)
    for (int64_t q = std::max<int64_t>(0, i0 + r - j0); q < Q && j0 + q < n; ++q) c[(i0 + r) * n + j0 + q] += tile[r][q];
}

// 3×4 tiles of the upper triangle: 12 accumulators, 3 rows of A held in registers and one
// row of B streamed (all 16 AVX2 registers); each step of 8 observations is 12 FMAs for
// 7 loads, so FMA throughput bounds it. The 3 rows stay in L1 while the tile sweeps
// along j; B is taken in blocks of rows that fit in L2 (a 4 KiB row is read by every
// tile row above it, from L3 if the whole of B is swept each time).
__attribute__((target("avx2,fma"))) void gram_upper_add_avx2(const float* a, int64_t n, int64_t ld, double* c,
                                                             int64_t i_begin, int64_t i_end) {
  const int64_t block = std::max<int64_t>(4, (int64_t{1} << 18) / (4 * ld) / 4 * 4);  // 256 KiB of B
  for (int64_t jb = i_begin / 4 * 4; jb < n; jb += block) {
    const int64_t jb_end = std::min(n, jb + block);
    for (int64_t i0 = i_begin; i0 < std::min(i_end, jb_end); i0 += 3) {
      const float* a0 = a + i0 * ld;
      const float* a1 = a0 + ld;
      const float* a2 = a1 + ld;
      for (int64_t j0 = std::max(jb, i0 / 4 * 4); j0 < jb_end; j0 += 4) {
        const float* b = a + j0 * ld;
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
        __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
        __m256 c20 = c00, c21 = c00, c22 = c00, c23 = c00;
        for (int64_t t = 0; t < ld; t += 8) {
          const __m256 x0 = _mm256_loadu_ps(a0 + t), x1 = _mm256_loadu_ps(a1 + t), x2 = _mm256_loadu_ps(a2 + t);
          __m256 y = _mm256_loadu_ps(b + t);
          c00 = _mm256_fmadd_ps(x0, y, c00), c10 = _mm256_fmadd_ps(x1, y, c10), c20 = _mm256_fmadd_ps(x2, y, c20);
          y = _mm256_loadu_ps(b + ld + t);
          c01 = _mm256_fmadd_ps(x0, y, c01), c11 = _mm256_fmadd_ps(x1, y, c11), c21 = _mm256_fmadd_ps(x2, y, c21);
          y = _mm256_loadu_ps(b + 2 * ld + t);
          c02 = _mm256_fmadd_ps(x0, y, c02), c12 = _mm256_fmadd_ps(x1, y, c12), c22 = _mm256_fmadd_ps(x2, y, c22);
          y = _mm256_loadu_ps(b + 3 * ld + t);
          c03 = _mm256_fmadd_ps(x0, y, c03), c13 = _mm256_fmadd_ps(x1, y, c13), c23 = _mm256_fmadd_ps(x2, y, c23);
        }
        const __m128 s[3] = {hsum4(c00, c01, c02, c03), hsum4(c10, c11, c12, c13), hsum4(c20, c21, c22, c23)};
        if (j0 >= i0 + 2 && j0 + 4 <= n && i0 + 3 <= i_end) {  // wholly inside the upper triangle and the rows
          for (int64_t r = 0; r < 3; ++r) {
            double* out = c + (i0 + r) * n + j0;
            _mm256_storeu_pd(out, _mm256_add_pd(_mm256_loadu_pd(out), _mm256_cvtps_pd(s[r])));
          }
          continue;
        }
        alignas(16) float tile[3][4];
        for (int64_t r = 0; r < 3; ++r) _mm_store_ps(tile[r], s[r]);
        add_edge_tile<3, 4>(tile, c, n, i0, j0, i_end);
      }
    }
  }
}

// The same sweep in 16-lane registers, in 6×4 tiles: 24 accumulators, 6 rows of A and
// one row of B (31 of the 32 registers); each step of 16 observations is 24 FMAs for 10
// loads. The 6 rows of A stay in L1 while the tile sweeps along j, so only the 4 rows of
// B come from L2: a third of the L2 traffic per FMA of a 3×8 tile, which L2 could not
// keep up with at two 512-bit FMAs a cycle.
__attribute__((target("avx512f,avx512dq,avx2,fma"))) void gram_upper_add_avx512(const float* a, int64_t n, int64_t ld,
                                                                               double* c, int64_t i_begin,
                                                                               int64_t i_end) {
  constexpr int R = 6, Q = 4;
  const int64_t block = std::max<int64_t>(Q, (int64_t{1} << 18) / (4 * ld) / Q * Q);  // 256 KiB of B
  for (int64_t jb = i_begin / Q * Q; jb < n; jb += block) {
    const int64_t jb_end = std::min(n, jb + block);
    for (int64_t i0 = i_begin; i0 < std::min(i_end, jb_end); i0 += R) {
      const float* a0 = a + i0 * ld;
      for (int64_t j0 = std::max(jb, i0 / Q * Q); j0 < jb_end; j0 += Q) {
        const float* b = a + j0 * ld;
        __m512 acc[R][Q];
        for (auto& row : acc)
          for (auto& v : row) v = _mm512_setzero_ps();
        for (int64_t t = 0; t < ld; t += 16) {
          __m512 x[R];
#pragma GCC unroll 6
          for (int r = 0; r < R; ++r) x[r] = _mm512_loadu_ps(a0 + r * ld + t);
#pragma GCC unroll 4
          for (int q = 0; q < Q; ++q) {
            __m512 y = _mm512_loadu_ps(b + q * ld + t);
            asm("" : "+v"(y));  // one load for six FMAs: GCC would fold it into each of them
#pragma GCC unroll 6
            for (int r = 0; r < R; ++r) acc[r][q] = _mm512_fmadd_ps(x[r], y, acc[r][q]);
          }
        }
        __m128 s[R];
        for (int r = 0; r < R; ++r) {
          __m256 h[Q];
          for (int q = 0; q < Q; ++q)
            h[q] = _mm256_add_ps(_mm512_castps512_ps256(acc[r][q]), _mm512_extractf32x8_ps(acc[r][q], 1));
          s[r] = hsum4(h[0], h[1], h[2], h[3]);
        }
        if (j0 >= i0 + R - 1 && j0 + Q <= n && i0 + R <= i_end) {  // wholly inside the upper triangle and the rows
          for (int64_t r = 0; r < R; ++r) {
            double* out = c + (i0 + r) * n + j0;
            _mm256_storeu_pd(out, _mm256_add_pd(_mm256_loadu_pd(out), _mm256_cvtps_pd(s[r])));
          }
          continue;
        }
        alignas(16) float tile[R][Q];
        for (int64_t r = 0; r < R; ++r) _mm_store_ps(tile[r], s[r]);
        add_edge_tile<R, Q>(tile, c, n, i0, j0, i_end);
      }
    }
  }
}

// AVX-512 where the CPU has it, unless AFIE_GRAM_KERNEL=avx2 asks for the narrower
// kernel (read once; the tests use it to run both kernels on one machine).
bool use_avx512() {
  static const bool ok = [] {
    const char* want = std::getenv("AFIE_GRAM_KERNEL");
    const bool allowed = !want || std::strcmp(want, "avx2") != 0;
    return allowed && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
}

}  // namespace

const char* gram_kernel() { return !gram_available() ? "none" : use_avx512() ? "avx512" : "avx2"; }

void gram_upper_add(const float* a, int64_t n, int64_t ld, double* c, int64_t i_begin, int64_t i_end) {
  if (use_avx512()) return gram_upper_add_avx512(a, n, ld, c, i_begin, i_end);
  gram_upper_add_avx2(a, n, ld, c, i_begin, i_end);
}

// Adds Σ p[0..len) in double to four chains (one would wait on each add's latency),
// prefetching pf[0..len) alongside when pf is given.
__attribute__((target("avx2,fma"))) inline void add_run(const float* p, int64_t len, const float* pf, __m256d (&a)[4],
                                                        double& tail) {
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + t), _MM_HINT_T0);
    const __m256 u = _mm256_loadu_ps(p + t), v = _mm256_loadu_ps(p + t + 8);
    a[0] = _mm256_add_pd(a[0], _mm256_cvtps_pd(_mm256_castps256_ps128(u)));
    a[1] = _mm256_add_pd(a[1], _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1)));
    a[2] = _mm256_add_pd(a[2], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    a[3] = _mm256_add_pd(a[3], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  for (; t + 4 <= len; t += 4) a[0] = _mm256_add_pd(a[0], _mm256_cvtps_pd(_mm_loadu_ps(p + t)));
  for (; t < len; ++t) tail += p[t];
}

__attribute__((target("avx2,fma"))) inline double total(const __m256d (&a)[4], double tail) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a[0], a[1]), _mm256_add_pd(a[2], a[3])));
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + tail;
}

// o[0..len) = p[0..len) − mu (o may be p).
__attribute__((target("avx2,fma"))) inline void centre_run(const float* p, int64_t len, float mu, float* o) {
  const __m256 m8 = _mm256_set1_ps(mu);
  int64_t t = 0;
  for (; t + 8 <= len; t += 8) _mm256_storeu_ps(o + t, _mm256_sub_ps(_mm256_loadu_ps(p + t), m8));
  for (; t < len; ++t) o[t] = p[t] - mu;
}

// o[t] = p[t·s] for t < len, s > 1 (a strided view: a stride-2 conv's input, a subsampled
// map), prefetching the same run two channels ahead (at pf) one cache line at a time.
__attribute__((target("avx2,fma"))) void gather_run(const float* p, int64_t s, int64_t len, float* o, const float* pf) {
  for (int64_t b = 0; b < (len - 1) * s + 1; b += 16) _mm_prefetch(reinterpret_cast<const char*>(pf + b), _MM_HINT_T0);
  int64_t t = 0;
  if (s == 2)  // two loads and two shuffles per 8 (t + 9 ≤ len: never a load past the run's last element)
    for (; t + 9 <= len; t += 8) {
      const __m256 u = _mm256_loadu_ps(p + 2 * t), v = _mm256_loadu_ps(p + 2 * t + 8);
      const __m256 e = _mm256_shuffle_ps(u, v, _MM_SHUFFLE(2, 0, 2, 0));  // u0 u2 v0 v2 | u4 u6 v4 v6
      _mm256_storeu_ps(o + t, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
    }
  for (; t < len; ++t) o[t] = p[t * s];
}

__attribute__((target("avx2,fma"))) void gram_fill_f32(const float* x, int64_t sC, int64_t sL, const GramRun* runs,
                                                       int64_t nruns, int64_t k, int64_t c0, int64_t c1, float* out,
                                                       int64_t ld, double* sums) {
  for (int64_t c = c0; c < c1; ++c) {
    const float* xc = x + c * sC;
    float* row = out + c * ld;
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    double tail = 0.0;
    if (sL == 1) {
      // Channels lie 4 KiB or more apart, on pages of their own that the hardware
      // prefetcher will not enter: fetch the channel after next meanwhile. The row is
      // then centred from the source, now in L1.
      for (int64_t q = 0; q < nruns; ++q) add_run(xc + runs[q].off, runs[q].len, xc + 2 * sC + runs[q].off, acc, tail);
      sums[c] = total(acc, tail);
      const float mu = static_cast<float>(sums[c] / double(k));
      for (int64_t q = 0; q < nruns; ++q) centre_run(xc + runs[q].off, runs[q].len, mu, row + runs[q].j);
    } else {  // gathered into the row first, then summed and centred there
      for (int64_t q = 0; q < nruns; ++q)
        gather_run(xc + runs[q].off, sL, runs[q].len, row + runs[q].j, xc + 2 * sC + runs[q].off);
      add_run(row, k, nullptr, acc, tail);
      sums[c] = total(acc, tail);
      centre_run(row, k, static_cast<float>(sums[c] / double(k)), row);
    }
    std::fill(row + k, row + ld, 0.0f);
  }
}

#else  // other CPUs: BLAS does the work (comoments.cpp asks gram_available first)

bool gram_available() { return false; }

const char* gram_kernel() { return "none"; }

void gram_upper_add(const float* a, int64_t n, int64_t ld, double* c, int64_t i_begin, int64_t i_end) {
  for (int64_t i = i_begin; i < i_end; ++i)
    for (int64_t j = i; j < n; ++j) {
      float s = 0.0f;
      for (int64_t t = 0; t < ld; ++t) s += a[i * ld + t] * a[j * ld + t];
      c[i * n + j] += s;
    }
}

void gram_fill_f32(const float* x, int64_t sC, int64_t sL, const GramRun* runs, int64_t nruns, int64_t k, int64_t c0,
                   int64_t c1, float* out, int64_t ld, double* sums) {
  for (int64_t c = c0; c < c1; ++c) {
    double sum = 0.0;
    for (int64_t q = 0; q < nruns; ++q)
      for (int64_t t = 0; t < runs[q].len; ++t) sum += x[c * sC + runs[q].off + t * sL];
    sums[c] = sum;
    const float mu = static_cast<float>(sum / double(k));
    float* row = out + c * ld;
    for (int64_t q = 0; q < nruns; ++q)
      for (int64_t t = 0; t < runs[q].len; ++t) row[runs[q].j + t] = x[c * sC + runs[q].off + t * sL] - mu;
    std::fill(row + k, row + ld, 0.0f);
  }
}

#endif

}  // namespace afie

#include "linalg.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "blas.h"
#include "parallel.h"

namespace afie {
namespace {

void check_info(int info, const char* routine) {
  if (info != 0)
    throw std::runtime_error(std::string(routine) + " failed (info = " + std::to_string(info) + ")");
}

// One syevd in precision T on a private copy; workspace sized by a query.
template <class T>
struct Syevd {
  int n;
  bool vectors;
  std::vector<T> a, w, work;
  std::vector<int> iwork;

  Syevd(int n_, bool vectors_) : n(n_), vectors(vectors_), a(size_t(n_) * n_), w(n_) {
    T wq = 0;
    int iq = 0, info = 0;
    blas::syevd(vectors ? "V" : "N", n, a.data(), w.data(), &wq, -1, &iq, -1, &info);
    check_info(info, "syevd workspace query");
    work.resize(size_t(wq) + 1);
    iwork.resize(size_t(std::max(iq, 1)));
  }

  void operator()(const double* src, double* w_out, double* v) {
    std::copy(src, src + a.size(), a.begin());  // row-major lower == column-major upper
    int info = 0;
    blas::syevd(vectors ? "V" : "N", n, a.data(), w.data(), work.data(), int(work.size()), iwork.data(),
                int(iwork.size()), &info);
    check_info(info, "syevd");
    std::copy(w.begin(), w.end(), w_out);
    if (v)  // column-major eigenvectors → row-major with eigenvectors as columns
      for (int r = 0; r < n; ++r)
        for (int i = 0; i < n; ++i) v[size_t(r) * n + i] = a[r + size_t(i) * n];
  }
};

template <class T>
void eigh_jobs(const std::vector<EighJob>& jobs, int threads) {
  std::vector<std::unique_ptr<Syevd<T>>> solvers(size_t(std::max(threads, 1)));  // one per worker, reused
  blas::use_threads(1);
  for_each_costliest_first(int64_t(jobs.size()), threads, [&](int64_t i) { return jobs[size_t(i)].C; },
                           [&](int64_t i, int64_t worker) {
                             const EighJob& job = jobs[size_t(i)];
                             if (job.C == 0) return;
                             auto& solve = solvers[size_t(worker)];
                             if (!solve || solve->n != job.C || solve->vectors != (job.v != nullptr))
                               solve = std::make_unique<Syevd<T>>(int(job.C), job.v != nullptr);
                             (*solve)(job.a, job.w, job.v);
                           });
}

// The root of Σ_i z_i / (e_i − x) = 0 strictly between the poles e[k] < e[k+1] (e holds
// the active poles shifted so that one of these two is 0, which keeps the root's
// distance to its nearest pole to full relative precision). Each step fits
// a + s_lo/(e_k − x) + s_hi/(e_{k+1} − x) to the two halves of the sum (value and slope
// at x) and takes that model's root; a bracket keeps every step inside the interval.
double secular_root(const double* e, const double* z, int64_t P, int64_t k, double x) {
  const double p = e[k], q = e[k + 1];
  double lo = p, hi = q;
  for (int it = 0; it < 64; ++it) {
    double f_lo = 0, d_lo = 0, f_hi = 0, d_hi = 0;
    for (int64_t i = 0; i <= k; ++i) {
      const double r = 1.0 / (e[i] - x);
      f_lo += z[i] * r;
      d_lo += z[i] * r * r;
    }
    for (int64_t i = k + 1; i < P; ++i) {
      const double r = 1.0 / (e[i] - x);
      f_hi += z[i] * r;
      d_hi += z[i] * r * r;
    }
    const double f = f_lo + f_hi;
    if (f == 0) return x;
    (f > 0 ? hi : lo) = x;  // f increases through the interval
    const double s_lo = d_lo * (p - x) * (p - x), s_hi = d_hi * (q - x) * (q - x);
    const double a = (f_lo - s_lo / (p - x)) + (f_hi - s_hi / (q - x));
    // a(p−y)(q−y) + s_lo(q−y) + s_hi(p−y) = 0, written as A y² − B y + Cc = 0.
    const double A = a, B = a * (p + q) + s_lo + s_hi, Cc = a * p * q + s_lo * q + s_hi * p;
    double y;
    if (std::fabs(A) * std::max(std::fabs(p), std::fabs(q)) <= 1e-300 + 1e-14 * std::fabs(B)) {
      y = Cc / B;
    } else {
      const double disc = std::sqrt(std::max(B * B - 4 * A * Cc, 0.0));
      const double t = 0.5 * (B + std::copysign(disc, B));
      const double y1 = t / A, y2 = Cc / t;
      y = (y1 > lo && y1 < hi) ? y1 : y2;
    }
    if (!(y > lo && y < hi)) y = 0.5 * (lo + hi);
    const double step = std::fabs(y - x);
    x = y;
    if (step <= 4 * std::numeric_limits<double>::epsilon() * std::fabs(x) || hi - lo <= 2 * std::numeric_limits<double>::epsilon() * std::max(std::fabs(lo), std::fabs(hi)))
      break;
  }
  return x;
}

// Eigenvalues of A with row/column j deleted, from A's eigenpairs; see leave_one_out_cpu.
void leave_one_out_row(int64_t C, const double* w, const double* v, int64_t j, double* out) {
  const double eps = std::numeric_limits<double>::epsilon();
  const double scale = std::max(std::fabs(w[0]), std::fabs(w[C - 1]));
  const double tol_equal = 8.0 * double(C) * eps * scale;  // eigenvalues this close are one
  const double tol_weight = eps * eps;                     // a pole this light is deflated
  std::vector<double> d, z;                                // active poles and their weights
  d.reserve(C), z.reserve(C);
  int64_t n_out = 0;
  for (int64_t i = 0; i < C;) {
    // A group of (numerically) equal eigenvalues: its multiplicity − 1 survive in A_j, and
    // it acts as one pole weighted by the squared norm of its eigenvectors' j-components.
    int64_t g = i;
    double weight = 0;
    while (g < C && w[g] - w[i] <= tol_equal) {
      weight += v[j * C + g] * v[j * C + g];
      ++g;
    }
    for (int64_t t = i + 1; t < g; ++t) out[n_out++] = w[i];
    if (weight <= tol_weight) {
      out[n_out++] = w[i];  // deflated: its eigenvalue stays too
    } else {
      d.push_back(w[i]);
      z.push_back(weight);
    }
    i = g;
  }
  const int64_t P = int64_t(d.size());
  std::vector<double> e(P);
  for (int64_t k = 0; k + 1 < P; ++k) {
    // Shift to the pole nearer the root (f at the midpoint says which half holds it).
    const double mid = d[k] + 0.5 * (d[k + 1] - d[k]);
    double f = 0;
    for (int64_t i = 0; i < P; ++i) f += z[i] / (d[i] - mid);
    const double origin = f > 0 ? d[k] : d[k + 1];
    for (int64_t i = 0; i < P; ++i) e[i] = d[i] - origin;
    out[n_out++] = origin + secular_root(e.data(), z.data(), P, k, mid - origin);
  }
  std::sort(out, out + n_out);
}

}  // namespace

void eigh_cpu(const std::vector<EighJob>& jobs, bool single, int threads) {
  if (single) eigh_jobs<float>(jobs, threads);
  else eigh_jobs<double>(jobs, threads);
}

void singular_values_cpu(int64_t R, int64_t K, const double* m, double* s, int threads) {
  if (R == 0 || K == 0) return;
  // Spectra are small and many: single-threaded LAPACK leaves no pooled OpenBLAS workers
  // spinning (see parallel.h).
  (void)threads;
  blas::use_threads(1);
  // A row-major R×K matrix is a column-major K×R one: its transpose, same singular values.
  int rows = int(K), cols = int(R), lda = int(K), one = 1, info = 0, lw = -1;
  std::vector<double> a(m, m + R * K);
  std::vector<int> iwork(8 * size_t(std::min(R, K)));
  double wq = 0, dummy = 0;
  AFIE_BLAS(dgesdd_)("N", &rows, &cols, a.data(), &lda, s, &dummy, &one, &dummy, &one, &wq, &lw, iwork.data(), &info, 1);
  check_info(info, "dgesdd workspace query");
  std::vector<double> work(size_t(wq) + 1);
  lw = int(work.size());
  AFIE_BLAS(dgesdd_)("N", &rows, &cols, a.data(), &lda, s, &dummy, &one, &dummy, &one, work.data(), &lw, iwork.data(), &info, 1);
  check_info(info, "dgesdd");
}

void leave_one_out_cpu(int64_t C, const double* w, const double* v, double* out, int threads) {
  if (C <= 1) return;  // deleting the only row leaves nothing
  parallel_for(C, threads, [&](int64_t j) { leave_one_out_row(C, w, v, j, out + j * (C - 1)); });
}

namespace {

// Mirrors the mean of both triangles into both: exactly symmetric, so that every later
// reader sees the same matrix whichever triangle it reads.
void symmetrise(int64_t n, double* x) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) x[j * n + i] = x[i * n + j] = 0.5 * (x[i * n + j] + x[j * n + i]);
}

// wa = W A (C×K, row-major). Row-major X is column-major Xᵀ, and (W A)ᵀ = A Wᵀ (A symmetric).
std::vector<double> times_a(int64_t C, int64_t K, const double* a, const double* w) {
  std::vector<double> wa(size_t(C) * K);
  blas::gemm("N", "N", int(K), int(C), int(K), a, int(K), w, int(K), wa.data(), int(K));
  return wa;
}

// m = XᵀX, both triangles, for row-major X (C×K) in precision T.
template <class T>
void gram_of_rows(int64_t C, int64_t K, const T* x, double* m_out) {
  const int k = int(K), c = int(C);
  std::vector<T> m(size_t(K) * K);
  blas::syrk("N", k, c, x, k, m.data(), k);  // column-major lower of Xᵀ X = row-major upper
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = i; j < K; ++j) m_out[j * K + i] = m_out[i * K + j] = double(m[size_t(i) * K + j]);
}

void congruence_reduced_one(const CongruenceJob& job, bool single) {
  const int64_t C = job.C, K = job.K;
  if (K == 0) {
    std::fill(job.d, job.d + C, 0.0);
    return;
  }
  // A = L Lᵀ makes W A Wᵀ = X Xᵀ with X = W L (C×K): d is X's squared row norms, and
  // m = XᵀX has W A Wᵀ's eigenvalues but for C − K zeros. One triangular product and one
  // SYRK, C·K² in all: half the flops of forming W A for d and then R A Rᵀ (RᵀR = WᵀW).
  // A semi-definite A (a dead input channel, fewer observations than channels) takes the
  // pivoted, rank-revealing Cholesky: Pᵀ A P = L Lᵀ on its first `rank` columns, X = W P L.
  // X and d are float64; with `single`, XᵀX is formed in float32: it feeds a float32
  // eigensolve, whose own rounding (ε₃₂·‖XᵀX‖) is the size of what that adds.
  const int k = int(K);
  std::vector<double> l(job.a, job.a + K * K);  // row-major symmetric == column-major
  std::vector<int> piv;
  int info = 0;
  AFIE_BLAS(dpotrf_)("L", &k, l.data(), &k, &info, 1);
  if (info != 0) {
    std::copy(job.a, job.a + K * K, l.begin());
    piv.resize(size_t(K));
    std::vector<double> work(2 * size_t(K));
    int rank = 0;
    const double tol = -1;  // LAPACK's default: K · eps · max pivot
    AFIE_BLAS(dpstrf_)("L", &k, l.data(), &k, piv.data(), &rank, &tol, work.data(), &info, 1);
    if (info < 0) check_info(info, "dpstrf");
    for (int64_t j = rank; j < K; ++j)  // the unfactored trailing block is not part of L
      std::fill(l.begin() + j * K + j, l.begin() + (j + 1) * K, 0.0);
  }
  // Row-major X (C×K) is column-major Xᵀ = Lᵀ (W P)ᵀ, K×C: W's rows, permuted, then Lᵀ from the left.
  std::vector<double> x(size_t(C) * K);
  for (int64_t i = 0; i < C; ++i)
    for (int64_t j = 0; j < K; ++j) x[size_t(i) * K + j] = job.w[size_t(i) * K + (piv.empty() ? j : piv[j] - 1)];
  blas::trmm_lower_t(k, int(C), l.data(), x.data());
  for (int64_t i = 0; i < C; ++i) {
    double s = 0;
    for (int64_t j = 0; j < K; ++j) s += x[size_t(i) * K + j] * x[size_t(i) * K + j];
    job.d[i] = s;
  }
  if (single) gram_of_rows(C, K, std::vector<float>(x.begin(), x.end()).data(), job.m);
  else gram_of_rows(C, K, x.data(), job.m);
}

}  // namespace

void congruence_cpu(int64_t C, int64_t K, const double* a, const double* w, double* out, int threads) {
  if (C == 0) return;
  if (K == 0) {
    std::fill(out, out + C * C, 0.0);
    return;
  }
  // Single-threaded like every BLAS call here: OpenBLAS's pooled workers would spin on
  // after it and take a core from whatever runs next (parallel.h).
  (void)threads;
  blas::use_threads(1);
  const std::vector<double> wa = times_a(C, K, a, w);
  blas::gemm("T", "N", int(C), int(C), int(K), wa.data(), int(K), w, int(K), out, int(C));  // (W A Wᵀ)ᵀ = W (W A)ᵀ
  symmetrise(C, out);
}

void congruence_reduced_cpu(const std::vector<CongruenceJob>& jobs, bool single, int threads) {
  for (const CongruenceJob& job : jobs)
    if (job.C < job.K) throw std::invalid_argument("congruence_reduced: needs C >= K");
  const auto cost = [&](int64_t i) {  // the C·K² of X = W L and of XᵀX
    const CongruenceJob& job = jobs[size_t(i)];
    return double(job.C) * double(job.K) * double(job.K);
  };
  blas::use_threads(1);
  for_each_costliest_first(int64_t(jobs.size()), threads, cost,
                           [&](int64_t i, int64_t) { congruence_reduced_one(jobs[size_t(i)], single); });
}

}  // namespace afie

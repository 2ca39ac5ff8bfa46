#include "comoments.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"

namespace afie {
namespace {

// Calls f(offset_of_first_obs, stride, count, k) for the runs covering observations
// [o0, o1), where k is the index (relative to o0) of the run's first observation.
template <class F>
void for_each_run(const Runs& r, int64_t o0, int64_t o1, F&& f) {
  for (int64_t o = o0; o < o1;) {
    const int64_t l = o % r.L;
    const int64_t len = std::min(r.L - l, o1 - o);
    f(r.offset(o), r.sL, len, o - o0);
    o += len;
  }
}

// Per-channel sums in double; false if any value is not finite.
template <DType T>
bool channel_sums(const Batch4& y, const Runs& r, int64_t m, double* sums) {
  std::fill(sums, sums + r.C, 0.0);
  bool finite = true;
  for_each_run(r, 0, m, [&](int64_t off, int64_t s, int64_t len, int64_t) {
    for (int64_t c = 0; c < r.C; ++c) {
      const int64_t base = off + c * r.sC;
      double acc = 0.0;
      for (int64_t t = 0; t < len; ++t) acc += Load<T>::at(y.data, base + t * s);
      sums[c] += acc;
    }
  });
  for (int64_t c = 0; c < r.C; ++c) finite = finite && std::isfinite(sums[c]);
  return finite;
}

// Writes observations [o0, o1) minus mu into buf: channel-major [C, k] or
// observation-major [k, C].
template <DType T, class Acc>
void fill_centred(const Batch4& y, const Runs& r, int64_t o0, int64_t o1, const double* mu,
                  bool obs_major, Acc* buf) {
  const int64_t k = o1 - o0;
  for_each_run(r, o0, o1, [&](int64_t off, int64_t s, int64_t len, int64_t j) {
    if (obs_major) {
      for (int64_t t = 0; t < len; ++t) {
        Acc* row = buf + (j + t) * r.C;
        const int64_t base = off + t * s;
        for (int64_t c = 0; c < r.C; ++c)
          row[c] = static_cast<Acc>(Load<T>::at(y.data, base + c * r.sC) - mu[c]);
      }
    } else {
      for (int64_t c = 0; c < r.C; ++c) {
        Acc* row = buf + c * k + j;
        const int64_t base = off + c * r.sC;
        const double mc = mu[c];
        for (int64_t t = 0; t < len; ++t) row[t] = static_cast<Acc>(Load<T>::at(y.data, base + t * s) - mc);
      }
    }
  });
}

}  // namespace

template <class Acc>
void fold_mean_and_mirror(int64_t C, double* n, Acc* mean, Acc* m2, double nb, const double* mb) {
  const double na = *n, nt = na + nb;
  const double w = na * nb / nt;
  std::vector<double> delta(C);
  for (int64_t c = 0; c < C; ++c) delta[c] = mb[c] - static_cast<double>(mean[c]);
  for (int64_t i = 0; i < C; ++i) {
    Acc* row = m2 + i * C;
    for (int64_t j = i; j < C; ++j) row[j] = static_cast<Acc>(row[j] + w * delta[i] * delta[j]);
  }
  for (int64_t i = 0; i < C; ++i)
    for (int64_t j = i + 1; j < C; ++j) m2[j * C + i] = m2[i * C + j];
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<Acc>(static_cast<double>(mean[c]) + delta[c] * (nb / nt));
  *n = nt;
}

template <class Acc>
void comoments_update_cpu(const Batch4& y, double* n, Acc* mean, Acc* m2, int threads) {
  const Runs r = collapse(y);
  const int64_t C = y.shape[1];
  const int64_t m = y.shape[0] * y.shape[2] * y.shape[3];
  if (m == 0) throw BadInput("empty batch: it holds no observations (N*H*W == 0)");

  // Pass 1: the batch mean, and the finiteness check that keeps the state untouched.
  std::vector<double> mu(C);
  const bool finite = dispatch_dtype(y.dtype, [&]<DType T>() { return channel_sums<T>(y, r, m, mu.data()); });
  if (!finite) throw BadInput("batch contains NaN or Inf values");
  for (auto& v : mu) v /= static_cast<double>(m);

  // Pass 2: centre chunks of observations on the batch mean and SYRK them into the
  // upper triangle of M2 (the batch's own co-moment, added straight into the state).
  // Observation-major buffers when channels are the fast axis, channel-major otherwise,
  // so both fills read memory in order.
  const bool obs_major = r.sC == 1 && r.sL != 1;
  const int64_t chunk = std::clamp<int64_t>((int64_t{1} << 20) / std::max<int64_t>(C, 1), 256, m);
  std::vector<Acc> buf(static_cast<size_t>(chunk * C));
  blas::use_threads(threads);
  for (int64_t o0 = 0; o0 < m; o0 += chunk) {
    const int64_t o1 = std::min(m, o0 + chunk);
    dispatch_dtype(y.dtype, [&]<DType T>() { fill_centred<T, Acc>(y, r, o0, o1, mu.data(), obs_major, buf.data()); });
    blas::syrk_upper(obs_major, static_cast<int>(C), static_cast<int>(o1 - o0), buf.data(), m2);
  }
  fold_mean_and_mirror<Acc>(C, n, mean, m2, static_cast<double>(m), mu.data());
}

template <class Acc>
void comoments_merge_cpu(int64_t C, double* n_a, Acc* mean_a, Acc* m2_a, const double* n_b,
                         const Acc* mean_b, const Acc* m2_b) {
  if (*n_b == 0) return;
  // M2_a += M2_b on the upper triangle, then the shared fold adds δδᵀ·n_a n_b/n.
  for (int64_t i = 0; i < C; ++i)
    for (int64_t j = i; j < C; ++j) m2_a[i * C + j] += m2_b[i * C + j];
  std::vector<double> mb(mean_b, mean_b + C);
  fold_mean_and_mirror<Acc>(C, n_a, mean_a, m2_a, *n_b, mb.data());
}

template void comoments_update_cpu<double>(const Batch4&, double*, double*, double*, int);
template void comoments_update_cpu<float>(const Batch4&, double*, float*, float*, int);
template void comoments_merge_cpu<double>(int64_t, double*, double*, double*, const double*, const double*, const double*);
template void comoments_merge_cpu<float>(int64_t, double*, float*, float*, const double*, const float*, const float*);
template void fold_mean_and_mirror<double>(int64_t, double*, double*, double*, double, const double*);
template void fold_mean_and_mirror<float>(int64_t, double*, float*, float*, double, const double*);

}  // namespace afie

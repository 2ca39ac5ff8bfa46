#include "comoments.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "gram.h"
#include "parallel.h"

namespace afie {
namespace {

// Where each accumulate strategy takes over (choose_path below reads them all).
// Layers at least this wide take every thread to each step of one chunk (update_wide): a
// per-thread partial state of C² doubles would cost more to fold than it saves.
constexpr int64_t kWide = 512;

// Channel-major layers with float products run on gram_upper_add: narrower than kGramMax
// each worker takes its own L2-sized chunks (update_gram); wider, the workers share each
// chunk of kGramPanel observations (update_gram_wide). There is no upper bound: on two
// Zen 5 cores the kernel took 1.0× (2048–4096 channels, 784 observations) down to 0.45×
// (2048 at 14×14, batches of 4) the time of the OpenBLAS path that used to take layers
// from 1024 channels (EfficientNet-B0's 1152 at 7×7: 0.73×; accumulate timings, median
// of 7–15, one build after the other).
constexpr int64_t kGramMax = 256;
constexpr int64_t kGramPanel = 512;  // the kernel's best row length (43 GMAC/s a core vs 40 at 1024)
constexpr int64_t kGramPanelMax = 1024;  // a wide batch this short is one chunk (update_gram_wide)


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

// Copies len elements at stride s from element offset off into out as Work and returns
// their sum in double. Long runs keep eight partial sums: one running sum is a chain of
// dependent adds (4 cycles each), and this loop touches every activation.
template <DType T, class Work>
double copy_sum(const void* data, int64_t off, int64_t s, int64_t len, Work* __restrict out) {
  if (len < 32) {
    double sum = 0.0;
    for (int64_t t = 0; t < len; ++t) {
      const double v = Load<T>::at(data, off + t * s);
      out[t] = static_cast<Work>(v);
      sum += v;
    }
    return sum;
  }
  double acc[8] = {};
  int64_t t = 0;
  if (s == 1)
    for (; t + 8 <= len; t += 8)
      for (int u = 0; u < 8; ++u) {
        const double v = Load<T>::at(data, off + t + u);
        out[t + u] = static_cast<Work>(v);
        acc[u] += v;
      }
  for (; t < len; ++t) {
    const double v = Load<T>::at(data, off + t * s);
    out[t] = static_cast<Work>(v);
    acc[t & 7] += v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One read of observations [o0, o1): converts them into buf (channel-major [C, k] or
// observation-major [k, C]; k = ld when given, buf then pointing at this slice's first
// column or row of a wider chunk) and sums each channel in double.
template <DType T, class Work>
void fill_and_sum(const Batch4& y, const Runs& r, int64_t o0, int64_t o1, bool obs_major, Work* __restrict buf,
                  double* __restrict sums, int64_t ld = 0) {
  const int64_t k = ld ? ld : o1 - o0;
  std::fill(sums, sums + r.C, 0.0);
  for_each_run(r, o0, o1, [&](int64_t off, int64_t s, int64_t len, int64_t j) {
    if (obs_major) {  // channels are contiguous (sC == 1): one observation per row
      for (int64_t t = 0; t < len; ++t) {
        Work* __restrict row = buf + (j + t) * r.C;
        const int64_t base = off + t * s;
        for (int64_t c = 0; c < r.C; ++c) {
          const double v = Load<T>::at(y.data, base + c);
          row[c] = static_cast<Work>(v);
          sums[c] += v;
        }
      }
    } else {
      for (int64_t c = 0; c < r.C; ++c) sums[c] += copy_sum<T, Work>(y.data, off + c * r.sC, s, len, buf + c * k + j);
    }
  });
}

// buf −= mu for k observations, in the layout fill_and_sum wrote (the chunk is still in
// cache); ld: row length of a channel-major chunk this is a slice of.
template <class Work>
void centre(int64_t C, int64_t k, bool obs_major, const double* mu, Work* buf, int64_t ld = 0) {
  if (obs_major) {
    std::vector<Work> m(mu, mu + C);
    for (int64_t t = 0; t < k; ++t)
      for (int64_t c = 0; c < C; ++c) buf[t * C + c] -= m[c];
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const Work mc = static_cast<Work>(mu[c]);
      Work* row = buf + c * (ld ? ld : k);
      for (int64_t t = 0; t < k; ++t) row[t] -= mc;
    }
  }
}

// Splits the rows [0, rows) of an upper triangle into contiguous runs of about equal area,
// one per worker (fewer when there are fewer rows): worker t takes [edge[t], edge[t+1]).
std::vector<int64_t> split_triangle(int64_t rows, int64_t workers) {
  workers = std::max<int64_t>(1, std::min(workers, rows));
  std::vector<int64_t> edge(workers + 1, rows);
  edge[0] = 0;
  for (int64_t t = 1, row = 0; t < workers; ++t) {
    const double share = double(t) / double(workers), all = double(rows) * double(rows);
    while (row < rows && 1.0 - double(rows - row) * double(rows - row) / all < share) ++row;
    edge[t] = row;
  }
  return edge;
}

// The caller's state ← state ⊕ (nb, mean_b, M2_b), M2_b read from the upper triangle of
// b (nullptr: already added to m2's upper triangle in place), written to both triangles
// tile by tile (each tile mirrored while it is in L1) and split over `workers` by equal
// areas of the triangle: for wide layers this pass over the C×C double state costs as
// much as a slice of the SYRK.
template <class A, class B>
void fold_state(int64_t C, double* n, A* mean, A* m2, double nb, const double* mean_b, const B* b, int64_t workers) {
  const double na = *n, nt = na + nb, w = na * nb / nt;
  std::vector<double> delta(C, 0.0);
  if (na > 0)
    for (int64_t c = 0; c < C; ++c) delta[c] = mean_b[c] - static_cast<double>(mean[c]);
  constexpr int64_t T = 32;
  const int64_t tiles = (C + T - 1) / T;
  const std::vector<int64_t> edge = split_triangle(tiles, workers);  // tile rows [edge[t], edge[t+1])
  fork_join(int64_t(edge.size()) - 1, [&](int64_t t) {
    for (int64_t bi = edge[t]; bi < edge[t + 1]; ++bi)
      for (int64_t bj = bi; bj < tiles; ++bj) {
        const int64_t i1 = std::min(C, bi * T + T), j1 = std::min(C, bj * T + T);
        for (int64_t i = bi * T; i < i1; ++i) {
          const double wi = w * delta[i];
          A* __restrict row = m2 + i * C;
          const B* __restrict brow = b ? b + i * C : nullptr;
          const int64_t j0 = std::max(bj * T, i);
          if (!brow)
            for (int64_t j = j0; j < j1; ++j) row[j] = static_cast<A>(static_cast<double>(row[j]) + wi * delta[j]);
          else if (na > 0)
            for (int64_t j = j0; j < j1; ++j) row[j] = static_cast<A>(static_cast<double>(row[j]) + brow[j] + wi * delta[j]);
          else
            for (int64_t j = j0; j < j1; ++j) row[j] = static_cast<A>(brow[j] + wi * delta[j]);
        }
        // The mirror image, from the tile just written (in L1): apart from the loops
        // above, which then vectorise.
        for (int64_t j = bj * T; j < j1; ++j)
          for (int64_t i = bi * T; i < std::min(i1, j); ++i) m2[j * C + i] = m2[i * C + j];
      }
  });
  for (int64_t c = 0; c < C; ++c)
    mean[c] = static_cast<A>(na > 0 ? static_cast<double>(mean[c]) + delta[c] * (nb / nt) : mean_b[c]);
  *n = nt;
}

// C[upper] = A·Aᵀ for one chunk, its upper-triangle blocks spread over `workers`
// single-threaded BLAS calls on the OpenMP pool (a chunk too wide to split by rows of
// observations: few observations of many channels).
template <class Work>
void syrk_upper_parallel(bool obs_major, int64_t C, int64_t k, const Work* a, Work* c, int64_t workers) {
  const int64_t parts = workers <= 1 ? 1 : 2 * workers;
  std::vector<int64_t> edge(parts + 1);
  for (int64_t p = 0; p <= parts; ++p) edge[p] = C * p / parts;
  struct Task { int64_t i, j; };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < parts; ++i)
    for (int64_t j = i; j < parts; ++j) tasks.push_back({i, j});
  fork_join(std::min<int64_t>(workers, int64_t(tasks.size())), [&](int64_t t) {
    for (size_t q = size_t(t); q < tasks.size(); q += size_t(std::min<int64_t>(workers, int64_t(tasks.size())))) {
      const Task& b = tasks[q];
      blas::syrk_block(obs_major, int(C), int(k), a, c, int(edge[b.i]), int(edge[b.i + 1] - edge[b.i]), int(edge[b.j]),
                       int(edge[b.j + 1] - edge[b.j]));
    }
  });
}

// The runs of observations [o0, o1) as a table that every channel of the chunk shares
// (for_each_run's index arithmetic, once per chunk rather than once per channel and run).
void chunk_runs(const Runs& r, int64_t o0, int64_t o1, std::vector<GramRun>& runs) {
  runs.clear();
  for_each_run(r, o0, o1, [&](int64_t off, int64_t, int64_t len, int64_t j) { runs.push_back({off, len, j}); });
}

// Channel-major chunk for gram_upper_add, channels [c0, c1) of the k observations in runs:
// sums[c] = Σ y[c, ·] in double, then row c of buf = y[c, ·] − μ_c in float, zero-padded
// to ld. Channel by channel, so the second read of a row comes from L1 (one pass copying
// and summing, then another centring, would stream the whole chunk twice more).
// float32 data takes gram_fill_f32.
template <DType T>
void fill_centred(const Batch4& y, const Runs& r, const std::vector<GramRun>& runs, int64_t k, int64_t c0, int64_t c1,
                  float* __restrict buf, int64_t ld, double* __restrict sums) {
  if (T == DType::f32) {
    gram_fill_f32(static_cast<const float*>(y.data), r.sC, r.sL, runs.data(), int64_t(runs.size()), k, c0, c1, buf, ld, sums);
  } else {
    for (int64_t c = c0; c < c1; ++c) {
      double acc[8] = {};
      for (const GramRun& run : runs)
        for (int64_t t = 0; t < run.len; ++t) acc[t & 7] += Load<T>::at(y.data, run.off + c * r.sC + t * r.sL);
      sums[c] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      const float mu = static_cast<float>(sums[c] / double(k));
      float* __restrict row = buf + c * ld;
      for (const GramRun& run : runs)
        for (int64_t t = 0; t < run.len; ++t)
          row[run.j + t] = static_cast<float>(Load<T>::at(y.data, run.off + c * r.sC + t * r.sL)) - mu;
      std::fill(row + k, row + ld, 0.0f);
    }
  }
  for (int64_t c = c0; c < c1; ++c)
    if (!std::isfinite(sums[c])) throw BadInput("batch contains NaN or Inf values");
}

// M2 += Σ_b n_b (μ_b − μ)(μ_b − μ)ᵀ on rows [i0, i1) of the upper triangle, for chunks b
// of n_b observations (means μ_b: rows of mu) that were each centred on their own mean:
// what turns the sum of the chunks' co-moments into the co-moment about the overall mean μ.
void add_chunk_means(int64_t C, int64_t i0, int64_t i1, const std::vector<double>& nb, const double* mu,
                     const double* overall, double* m2) {
  std::vector<double> d(C);
  for (size_t b = 0; b < nb.size(); ++b) {
    for (int64_t c = 0; c < C; ++c) d[c] = mu[int64_t(b) * C + c] - overall[c];
    for (int64_t i = i0; i < i1; ++i) {
      const double wi = nb[b] * d[i];
      double* row = m2 + i * C;
      for (int64_t j = i; j < C; ++j) row[j] += wi * d[j];
    }
  }
}

// Cache-line-aligned storage for chunks: the kernel's 32-byte row loads then never
// straddle two lines (which cost it 8% of its rate).
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const LineAligned<U>&) const { return true; }
};

// Per-thread scratch that outlives a call: fresh multi-MiB vectors each batch would cost a
// page fault per 4 KiB (and the pool's threads persist, so this is bounded).
template <class Work>
struct Scratch {
  std::vector<Work, LineAligned<Work>> buf;
  std::vector<Work> cm2;
  std::vector<GramRun> runs;
  std::vector<double> sums, mu, mean, m2;
  static Scratch& get() {
    thread_local Scratch s;
    return s;
  }
};

// The workers' partial states (count, mean, upper triangle of M2), owned by the calling
// thread: they are folded after the fork-join, when a worker's own thread (parallel.h's
// std::thread fallback) and so its thread_local Scratch are gone.
struct Partials {
  int64_t C = 0;
  std::vector<double> n, mean, m2;
  static Partials& get(int64_t workers, int64_t C) {
    thread_local Partials p;
    p.C = C, p.n.assign(size_t(workers), 0.0), p.mean.assign(size_t(workers * C), 0.0);
    p.m2.resize(size_t(workers * C * C));  // callers zero what they need zeroed
    return p;
  }
  double* mean_of(int64_t t) { return mean.data() + t * C; }
  double* m2_of(int64_t t) { return m2.data() + t * C * C; }
};

// A wide layer, chunk by chunk, all threads on each step: fill their slices of the chunk,
// centre them on the chunk's mean, SYRK blocks, then the fused fold into the state.
// Several chunks (large maps) gather in a private state first, so a non-finite value in
// a later chunk still leaves the caller's state untouched.
template <class Acc, class Work>
void update_wide(const Batch4& y, const Runs& r, bool obs_major, double* n, Acc* mean, Acc* m2, int64_t workers) {
  const int64_t C = y.shape[1], m = y.shape[0] * y.shape[2] * y.shape[3];
  // Up to 16 MiB of Work per chunk (the fold over C² is paid per chunk); at least C.
  const int64_t chunk = std::min(m, std::max<int64_t>((int64_t{1} << 24) / int64_t(sizeof(Work)) / C, C));
  Scratch<Work>& s = Scratch<Work>::get();
  s.buf.resize(size_t(chunk * C)), s.cm2.resize(size_t(C * C)), s.mu.resize(C), s.sums.resize(size_t(workers * C));
  const bool direct = chunk == m;
  double n_own = 0;
  if (!direct) s.mean.resize(C), s.m2.resize(size_t(C * C));
  for (int64_t o0 = 0; o0 < m; o0 += chunk) {
    const int64_t o1 = std::min(m, o0 + chunk), k = o1 - o0;
    auto first = [&](int64_t t) { return o0 + k * t / workers; };
    auto slice = [&](int64_t t) { return s.buf.data() + (obs_major ? (first(t) - o0) * C : first(t) - o0); };
    fork_join(workers, [&](int64_t t) {
      dispatch_dtype(y.dtype, [&]<DType T>() {
        fill_and_sum<T, Work>(y, r, first(t), first(t + 1), obs_major, slice(t), s.sums.data() + t * C, k);
      });
    });
    for (int64_t c = 0; c < C; ++c) {
      double total = 0;
      for (int64_t t = 0; t < workers; ++t) total += s.sums[t * C + c];
      if (!std::isfinite(total)) throw BadInput("batch contains NaN or Inf values");
      s.mu[c] = total / double(k);
    }
    fork_join(workers, [&](int64_t t) { centre(C, first(t + 1) - first(t), obs_major, s.mu.data(), slice(t), k); });
    syrk_upper_parallel(obs_major, C, k, s.buf.data(), s.cm2.data(), workers);
    if (direct) fold_state(C, n, mean, m2, double(k), s.mu.data(), s.cm2.data(), workers);
    else fold_state(C, &n_own, s.mean.data(), s.m2.data(), double(k), s.mu.data(), s.cm2.data(), workers);
  }
  if (!direct) fold_state(C, n, mean, m2, n_own, s.mean.data(), s.m2.data(), workers);
}

// Narrow channel-major layers with float products (see gram.h). Each worker takes a
// contiguous run of L2-sized chunks, centres each on its own mean μ_b and adds its
// products to a double partial S, then adds the chunks' means as one low-rank term,
// M2 = S + Σ_b n_b (μ_b − μ)(μ_b − μ)ᵀ, in place of a Chan fold per chunk (an O(C²)
// pass per 2¹⁶/C observations, which cost a sixth of the update at 256 channels).
// Workers fold into the caller's state in order, so the result is deterministic;
// non-finite data throws before that.
template <class Acc>
void update_gram(const Batch4& y, const Runs& r, double* n, Acc* mean, Acc* m2, int64_t workers_max) {
  const int64_t C = r.C, m = y.shape[0] * y.shape[2] * y.shape[3];
  const int64_t chunk = std::min(m, std::clamp<int64_t>((int64_t{1} << 16) / C / kGramCols * kGramCols, 256, kGramPanel));
  const int64_t chunks = (m + chunk - 1) / chunk, workers = std::min(workers_max, chunks);
  const int64_t ld = (chunk + kGramCols - 1) / kGramCols * kGramCols;
  const int64_t rows = (C + kGramRows - 1) / kGramRows * kGramRows;
  Partials& p = Partials::get(workers, C);
  fork_join(workers, [&](int64_t t) {
    Scratch<float>& s = Scratch<float>::get();
    const int64_t q0 = t * chunks / workers, q1 = (t + 1) * chunks / workers;
    double* const pmean = p.mean_of(t);
    double* const pm2 = p.m2_of(t);
    s.buf.resize(size_t(rows * ld)), s.mu.resize(size_t((q1 - q0) * C));
    std::fill(pm2, pm2 + C * C, 0.0);
    std::fill(s.buf.begin() + C * ld, s.buf.end(), 0.0f);  // padding rows
    double nt = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t o0 = q * chunk, o1 = std::min(m, o0 + chunk);
      double* mu = s.mu.data() + (q - q0) * C;
      chunk_runs(r, o0, o1, s.runs);
      dispatch_dtype(y.dtype, [&]<DType T>() { fill_centred<T>(y, r, s.runs, o1 - o0, 0, C, s.buf.data(), ld, mu); });
      gram_upper_add(s.buf.data(), C, ld, pm2, 0, C);
      for (int64_t c = 0; c < C; ++c) pmean[c] += mu[c], mu[c] /= double(o1 - o0);
      nt += double(o1 - o0);
    }
    for (int64_t c = 0; c < C; ++c) pmean[c] /= nt;
    std::vector<double> nb(static_cast<size_t>(q1 - q0));
    for (int64_t q = q0; q < q1; ++q) nb[size_t(q - q0)] = double(std::min(m, q * chunk + chunk) - q * chunk);
    add_chunk_means(C, 0, C, nb, s.mu.data(), pmean, pm2);
    p.n[t] = nt;
  });
  for (int64_t t = 0; t < workers; ++t) fold_state(C, n, mean, m2, p.n[t], p.mean_of(t), p.m2_of(t), workers_max);
}

// Wide channel-major layers (C ≥ kGramMax) with float products: few
// observations of many channels, so too few chunks to give each worker its own, and a C²
// partial per worker would cost more to fold than it saves. Each worker takes a share of
// the triangle's tile rows of one double S and runs through all the chunks (kGramPanel
// observations each) on its own: it fills and centres the whole chunk into its own
// buffer, then adds its rows of the chunk's products. The fill is repeated per worker
// (C·k reads against C²·k/2 products shared out, the second read from the shared cache)
// so that the workers never wait for each other inside the layer: with a barrier per
// chunk, a worker that the OS descheduled (a core shared with a DataLoader worker) held
// up every chunk. The chunks' means then enter as a low-rank term as in update_gram, and
// S folds into the state. A long panel keeps the kernel's tiles long (each tile ends in
// a horizontal sum and a store), and the kernel blocks B for L2.
//
// A batch of at most kGramPanelMax observations (a 7×7 map: 784 a batch of 16) is one
// chunk, and into a float64 state its products go straight into the state's rows: no S
// to clear, fill and read back, passes over C² doubles that cost as much as the products
// when there are fewer observations than channels (1152 at 7×7: about half the update).
// Each worker checks every channel before it adds anything, so a non-finite value still
// leaves the state untouched.
template <class Acc>
void update_gram_wide(const Batch4& y, const Runs& r, double* n, Acc* mean, Acc* m2, int64_t workers) {
  const int64_t C = r.C, m = y.shape[0] * y.shape[2] * y.shape[3];
  const int64_t chunk = m <= kGramPanelMax ? m : kGramPanel, chunks = (m + chunk - 1) / chunk;
  double* in_place = nullptr;
  if constexpr (std::is_same_v<Acc, double>)
    if (chunks == 1) in_place = m2;
  const int64_t ld = (chunk + kGramCols - 1) / kGramCols * kGramCols;
  const int64_t rows = (C + kGramRows - 1) / kGramRows * kGramRows;
  const std::vector<int64_t> edge = split_triangle((C + kGramTile - 1) / kGramTile, workers);
  workers = int64_t(edge.size()) - 1;
  auto row0 = [&](int64_t t) { return std::min(C, edge[t] * kGramTile); };  // worker t's rows of S
  // The caller's scratch holds the shared state (worker 0, on the calling thread, uses
  // only the chunk members of the same object).
  Scratch<float>& s = Scratch<float>::get();
  std::vector<double>&mu = s.mu, &S = s.m2, &overall = s.mean;
  mu.resize(size_t(chunks * C)), overall.assign(size_t(C), 0.0);
  if (!in_place) S.resize(size_t(C * C));
  fork_join(workers, [&](int64_t t) {
    Scratch<float>& w = Scratch<float>::get();  // this worker's own chunk
    w.buf.resize(size_t(rows * ld)), w.sums.resize(size_t(C));
    std::fill(w.buf.begin() + C * ld, w.buf.end(), 0.0f);  // padding rows
    double* const dst = in_place ? in_place : S.data();
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t o0 = q * chunk, o1 = std::min(m, o0 + chunk);
      chunk_runs(r, o0, o1, w.runs);
      double* sums = t == 0 ? mu.data() + q * C : w.sums.data();  // the same sums in every worker
      dispatch_dtype(y.dtype, [&]<DType T>() { fill_centred<T>(y, r, w.runs, o1 - o0, 0, C, w.buf.data(), ld, sums); });
      if (q == 0 && (!in_place || *n == 0)) std::fill(dst + row0(t) * C, dst + row0(t + 1) * C, 0.0);
      gram_upper_add(w.buf.data(), C, ld, dst, row0(t), row0(t + 1));
    }
  });
  std::vector<double> nb(static_cast<size_t>(chunks));
  for (int64_t q = 0; q < chunks; ++q) {
    nb[size_t(q)] = double(std::min(m, q * chunk + chunk) - q * chunk);
    for (int64_t c = 0; c < C; ++c) mu[q * C + c] /= nb[size_t(q)], overall[c] += nb[size_t(q)] / double(m) * mu[q * C + c];
  }
  if (chunks > 1)
    fork_join(workers, [&](int64_t t) { add_chunk_means(C, row0(t), row0(t + 1), nb, mu.data(), overall.data(), S.data()); });
  fold_state(C, n, mean, m2, double(m), overall.data(), in_place ? nullptr : S.data(), workers);
}

// The batch, chunk by chunk: fill (one read of the input), centre on the chunk's mean,
// SYRK into the chunk co-moment, fold into a running state. Each worker thread takes a
// contiguous run of chunks with its own state (and single-threaded BLAS, see
// parallel.h); the workers' states then fold into the caller's in order, so the result
// is deterministic. Non-finite data throws before anything reaches the caller's state.
template <class Acc, class Work>
void update_chunks(const Batch4& y, const Runs& r, bool obs_major, double* n, Acc* mean, Acc* m2, int64_t workers_max) {
  const int64_t C = r.C, m = y.shape[0] * y.shape[2] * y.shape[3];
  // Chunks of ≤ 2 MiB of Work values stay in cache between fill, centre and SYRK; at
  // least 256 observations keep SYRK efficient and the per-chunk O(C²) fold negligible.
  // Chunks also hold at least C observations, so the O(C²) fold of each stays small
  // next to its C²·k SYRK. Enough chunks for every thread: split observations; too few
  // (small maps): one chunk at a time, its SYRK split by blocks instead.
  int64_t chunk = std::max<int64_t>((int64_t{1} << 21) / int64_t(sizeof(Work)) / std::max<int64_t>(C, 1), C);
  chunk = std::clamp<int64_t>(std::min(chunk, (m + workers_max - 1) / workers_max), std::min<int64_t>(std::max<int64_t>(C, 256), m), m);
  const int64_t chunks = (m + chunk - 1) / chunk;
  const int64_t workers = chunks >= workers_max ? workers_max : 1;
  const int64_t syrk_workers = chunks >= workers_max ? 1 : workers_max;

  const bool direct = workers == 1 && chunks == 1;  // one chunk folds straight into the state
  Partials& p = Partials::get(direct ? 0 : workers, C);
  fork_join(workers, [&](int64_t t) {
    Scratch<Work>& s = Scratch<Work>::get();
    s.buf.resize(size_t(chunk * C)), s.cm2.resize(size_t(C * C)), s.sums.resize(C), s.mu.resize(C);
    for (int64_t q = t * chunks / workers; q < (t + 1) * chunks / workers; ++q) {
      const int64_t o0 = q * chunk, o1 = std::min(m, o0 + chunk), k = o1 - o0;
      dispatch_dtype(y.dtype, [&]<DType T>() { fill_and_sum<T, Work>(y, r, o0, o1, obs_major, s.buf.data(), s.sums.data()); });
      for (int64_t c = 0; c < C; ++c) {
        if (!std::isfinite(s.sums[c])) throw BadInput("batch contains NaN or Inf values");
        s.mu[c] = s.sums[c] / double(k);
      }
      centre(C, k, obs_major, s.mu.data(), s.buf.data());
      syrk_upper_parallel(obs_major, C, k, s.buf.data(), s.cm2.data(), syrk_workers);
      if (direct) fold_state(C, n, mean, m2, double(k), s.mu.data(), s.cm2.data(), 1);
      else fold_state(C, &p.n[t], p.mean_of(t), p.m2_of(t), double(k), s.mu.data(), s.cm2.data(), 1);
    }
  });
  if (!direct)
    for (int64_t t = 0; t < workers; ++t) fold_state(C, n, mean, m2, p.n[t], p.mean_of(t), p.m2_of(t), workers_max);
}

// Which strategy accumulates a batch, and why. Every threshold is in the table above it.
enum class Path {
  Gram,        // float products, NCHW, C < kGramMax, AVX2/AVX-512: each worker its own L2 chunks
  GramWide,    // float products, NCHW, C ≥ kGramMax, AVX2/AVX-512: workers share the triangle
  BlasWide,    // C ≥ kWide with threads and observations to spare: all threads on each chunk
  BlasChunks,  // the rest (channels_last, float64 products, narrow or tiny batches): chunks per worker
};

template <class Work>
Path choose_path(int64_t C, int64_t m, bool obs_major, int64_t workers) {
  if (std::is_same_v<Work, float> && !obs_major && gram_available())
    return C < kGramMax ? Path::Gram : Path::GramWide;
  if (C >= kWide && workers > 1 && m >= 2 * workers) return Path::BlasWide;
  return Path::BlasChunks;
}

template <class Acc, class Work>
void update_impl(const Batch4& y, double* n, Acc* mean, Acc* m2, int threads) {
  const Runs r = collapse(y);
  const int64_t workers = std::max(1, threads), m = y.shape[0] * y.shape[2] * y.shape[3];
  const bool obs_major = r.sC == 1 && r.sL != 1;  // read memory in order either way
  blas::use_threads(1);
  switch (choose_path<Work>(r.C, m, obs_major, workers)) {
    case Path::Gram: return update_gram(y, r, n, mean, m2, workers);
    case Path::GramWide: return update_gram_wide(y, r, n, mean, m2, workers);
    case Path::BlasWide: return update_wide<Acc, Work>(y, r, obs_major, n, mean, m2, workers);
    case Path::BlasChunks: return update_chunks<Acc, Work>(y, r, obs_major, n, mean, m2, workers);
  }
}

}  // namespace

template <class Acc>
void comoments_update_cpu(const Batch4& y, double* n, Acc* mean, Acc* m2, int threads, bool float_products) {
  // float products only for inputs that are no wider than float anyway.
  if constexpr (std::is_same_v<Acc, double>) {
    if (!float_products || y.dtype == DType::f64) return update_impl<double, double>(y, n, mean, m2, threads);
  }
  update_impl<Acc, float>(y, n, mean, m2, threads);
}

template <class Acc>
void comoments_merge_cpu(int64_t C, double* n_a, Acc* mean_a, Acc* m2_a, const double* n_b, const Acc* mean_b,
                         const Acc* m2_b) {
  if (*n_b == 0) return;
  std::vector<double> mb(mean_b, mean_b + C);
  fold_state(C, n_a, mean_a, m2_a, *n_b, mb.data(), m2_b, 1);
}

template void comoments_update_cpu<double>(const Batch4&, double*, double*, double*, int, bool);
template void comoments_update_cpu<float>(const Batch4&, double*, float*, float*, int, bool);
template void comoments_merge_cpu<double>(int64_t, double*, double*, double*, const double*, const double*, const double*);
template void comoments_merge_cpu<float>(int64_t, double*, float*, float*, const double*, const float*, const float*);

}  // namespace afie

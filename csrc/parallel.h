// A minimal fork-join. The core runs inside PyTorch forward hooks, between torch's own
// OpenMP regions. OpenBLAS's pooled workers keep spinning after a call and steal cores
// from the next convolution, so the core splits its work itself and calls BLAS
// single-threaded. With OpenMP, the split runs on the OpenMP pool: torch has already
// loaded libgomp.so.1, so this is torch's own pool, whose workers are still spinning
// from the last convolution and pick the work up at once (a second pool would fight
// them for the cores). Without OpenMP, plain std::threads.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace afie {

// Runs f(t) for every t in [0, workers), on up to `workers` threads.
template <class F>
void fork_join(int64_t workers, F&& f) {
  if (workers <= 1) {
    f(int64_t{0});
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int64_t t) {
    try {
      f(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
#ifdef _OPENMP
#pragma omp parallel for num_threads(int(workers)) schedule(static, 1)
  for (int64_t t = 0; t < workers; ++t) guarded(t);
#else
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : pool) th.join();
#endif
  if (error) std::rethrow_exception(error);
}

// Runs f(i) for i in [0, count) in contiguous slices over up to `threads` threads.
template <class F>
void parallel_for(int64_t count, int threads, F&& f) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, count));
  fork_join(workers, [&](int64_t t) {
    for (int64_t i = t * count / workers; i < (t + 1) * count / workers; ++i) f(i);
  });
}

// Runs f(job, worker) for every job in [0, count), the costliest first, on up to `threads`
// workers that each take the next job as they finish: the longest-processing-time rule,
// so that one big job does not run alone at the end.
template <class Cost, class F>
void for_each_costliest_first(int64_t count, int threads, Cost&& cost, F&& f) {
  std::vector<int64_t> order(size_t(std::max<int64_t>(count, 0)));
  for (int64_t i = 0; i < count; ++i) order[size_t(i)] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost(x) > cost(y); });
  std::atomic<size_t> next{0};
  fork_join(std::min<int64_t>(std::max(threads, 1), count), [&](int64_t worker) {
    for (size_t q; (q = next.fetch_add(1)) < order.size();) f(order[q], worker);
  });
}

}  // namespace afie

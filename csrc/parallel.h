// A minimal fork-join. The core runs inside PyTorch forward hooks, between torch's own
// OpenMP regions. OpenBLAS's pooled workers keep spinning after a call and steal cores
// from the next convolution, so the core splits its work itself and calls BLAS
// single-threaded. With OpenMP, the split runs on the OpenMP pool: torch has already
// loaded libgomp.so.1, so this is torch's own pool, whose workers are still spinning
// from the last convolution and pick the work up at once (a second pool would fight
// them for the cores). Without OpenMP, plain std::threads.
//
// A shared machine: when another process holds a core (a DataLoader worker), a worker
// thread of ours may wait milliseconds for the scheduler, and every region waits for it
// at the join. A region whose worker started over 1 ms late makes the next ones run on
// half the threads (on two cores: the calling thread alone, which on this project's
// machine made VGG-16's updates 2.4× faster with one core busy), then all threads are
// tried again. Every task is the same whichever thread runs it, so results do not change.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace afie {

// How far the regions are narrowed after a late start, and for how many more regions.
// Process-wide by nature (the machine's other load), the one piece of state in the core.
struct Contention {
  std::atomic<int> halvings{0};
  std::atomic<int> regions_left{0};
  static constexpr int kRegions = 64;                  // a few batches of a model, then retry
  static constexpr int64_t kLateNs = 1000000;          // 1 ms: descheduled, not just waking up
  static Contention& get() {
    static Contention c;
    return c;
  }
};

// Runs f(t) for every t in [0, workers), on up to `workers` threads (fewer while the
// machine is contended, see above).
template <class F>
void fork_join(int64_t workers, F&& f) {
  if (workers <= 1) {
    f(int64_t{0});
    return;
  }
  Contention& contention = Contention::get();
  int halvings = contention.halvings.load(std::memory_order_relaxed);
  if (halvings > 0 && contention.regions_left.fetch_sub(1, std::memory_order_relaxed) <= 1) {
    contention.halvings.store(0, std::memory_order_relaxed);  // try every thread again
    halvings = 0;
  }
  const int64_t threads = std::max<int64_t>(1, workers >> halvings);
  if (threads == 1) {
    for (int64_t t = 0; t < workers; ++t) f(t);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  std::atomic<int64_t> next{threads}, latest{0};
  const auto start = std::chrono::steady_clock::now();
  // Thread i runs task i, then (when narrowed) takes the tasks no thread was started for.
  auto run = [&](int64_t i) {
    if (i > 0) {
      const int64_t late = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
      int64_t seen = latest.load(std::memory_order_relaxed);
      while (late > seen && !latest.compare_exchange_weak(seen, late, std::memory_order_relaxed)) {
      }
    }
    try {
      f(i);
      for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < workers;) f(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
#ifdef _OPENMP
#pragma omp parallel for num_threads(int(threads)) schedule(static, 1)
  for (int64_t i = 0; i < threads; ++i) run(i);
#else
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; ++i) pool.emplace_back(run, i);
  run(0);
  for (auto& th : pool) th.join();
#endif
  if (latest.load(std::memory_order_relaxed) > Contention::kLateNs) {
    contention.regions_left.store(Contention::kRegions, std::memory_order_relaxed);
    contention.halvings.store(std::min(halvings + 1, 16), std::memory_order_relaxed);
  }
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

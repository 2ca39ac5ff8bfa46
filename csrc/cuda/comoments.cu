// Streaming co-moments on the device: batch mean (float64 atomics), then the centred
// co-moment Σ (y − μ_b)(y − μ_b)ᵀ over tiles of the upper triangle, read straight from
// the strided (N, C, H, W) batch (no permute copy), then the Chan fold of the batch into
// the state. Four launches per batch on the caller's stream, no host synchronisation.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace afie::cuda {
namespace {

constexpr int kTile = 64;   // output tile kTile × kTile of M2
constexpr int kDepth = 16;  // observations per shared-memory stage
constexpr int kThreads = 256;  // 16 × 16 threads, each owning a 4 × 4 block of the tile

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <DType T>
__device__ __forceinline__ double load(const void* p, int64_t i) { return Load<T>::at(p, i); }

// scratch[0..C) ← per-channel batch sums (then means), scratch[C] ← m, scratch[C+1] ← 1 if
// the batch holds NaN/Inf. Grid: (channel blocks, observation slices).
template <DType T>
__global__ void batch_sums_kernel(const void* y, Runs r, int64_t m, double* scratch) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= r.C) return;
  double acc = 0;
  for (int64_t o = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; o < m; o += int64_t(gridDim.y) * blockDim.x)
    acc += load<T>(y, r.offset(o) + c * r.sC);
  for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xffffffffu, acc, d);
  if (threadIdx.x == 0) atomicAdd(scratch + c, acc);
}

__global__ void batch_mean_kernel(int64_t C, int64_t m, double* scratch) {
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const double s = scratch[c];
    if (!isfinite(s)) bad = 1;
    scratch[c] = s / double(m);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    scratch[C] = double(m);
    scratch[C + 1] = bad;
  }
}

// One block per (upper-triangle tile, observation slice): accumulates the tile of
// Σ_o (y_oi − μ_i)(y_oj − μ_j) over its slice in Acc registers and adds it to m2.
template <DType T, class Acc>
__global__ void comoment_tiles_kernel(const void* y, Runs r, int64_t m, const double* scratch,
                                      Acc* m2) {
  // Grid (j tile, i tile, slice); tiles below the diagonal have nothing to do.
  if (blockIdx.x < blockIdx.y || scratch[r.C + 1] != 0) return;  // or a rejected batch
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  __shared__ Acc a[kDepth][kTile + 1], b[kDepth][kTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  Acc acc[4][4] = {};
  const int64_t per = (m + gridDim.z - 1) / gridDim.z;
  const int64_t o_begin = int64_t(blockIdx.z) * per, o_end = min(m, o_begin + per);
  // Channel-fast layouts load consecutive channels per warp, spatial-fast ones
  // consecutive observations, so global reads coalesce either way.
  const bool channel_fast = r.sC == 1;
  for (int64_t o0 = o_begin; o0 < o_end; o0 += kDepth) {
    for (int e = threadIdx.x; e < kDepth * kTile; e += kThreads) {
      const int k = channel_fast ? e / kTile : e % kDepth;
      const int c = channel_fast ? e % kTile : e / kDepth;
      const int64_t o = o0 + k;
      Acc va = 0, vb = 0;
      if (o < o_end) {
        const int64_t base = r.offset(o);
        if (i0 + c < r.C) va = Acc(load<T>(y, base + (i0 + c) * r.sC) - scratch[i0 + c]);
        if (j0 + c < r.C) vb = Acc(load<T>(y, base + (j0 + c) * r.sC) - scratch[j0 + c]);
      }
      a[k][c] = va;
      b[k][c] = vb;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      Acc ra[4], rb[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) ra[u] = a[k][ty * 4 + u], rb[u] = b[k][tx * 4 + u];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += ra[u] * rb[v];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t i = i0 + ty * 4 + u, j = j0 + tx * 4 + v;
      if (i < r.C && j < r.C && j >= i) atomicAdd(m2 + i * r.C + j, acc[u][v]);
    }
}

// The Chan fold shared by update and merge: with the other side's count nb and mean
// (scratch[0..C) holds μ_b on entry), M2 += δδᵀ·n_a n_b/n on the upper triangle, then
// mirror; mean and n follow. Three kernels so every read of the old state precedes its
// write.
template <class Acc>
__global__ void delta_kernel(int64_t C, const Acc* mean, double* scratch) {
  if (scratch[C + 1] != 0) return;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x)
    scratch[c] -= double(mean[c]);
}

template <class Acc>
__global__ void fold_m2_kernel(int64_t C, const double* n, Acc* m2, const double* scratch) {
  if (scratch[C + 1] != 0) return;
  const double na = *n, nb = scratch[C];
  const double w = na * nb / (na + nb);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < C * C; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / C, j = e % C;
    if (j < i) continue;
    const Acc v = Acc(double(m2[i * C + j]) + w * scratch[i] * scratch[j]);
    m2[i * C + j] = v;
    if (j > i) m2[j * C + i] = v;
  }
}

template <class Acc>
__global__ void fold_mean_kernel(int64_t C, double* n, Acc* mean, const double* scratch) {
  if (scratch[C + 1] != 0) return;
  const double na = *n, nb = scratch[C], frac = nb / (na + nb);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) mean[c] = Acc(double(mean[c]) + scratch[c] * frac);
  __syncthreads();
  if (threadIdx.x == 0) *n = na + nb;
}

__global__ void count_rejected_kernel(int64_t C, const double* scratch, int32_t* rejected) {
  if (scratch[C + 1] != 0) *rejected += 1;
}

template <class Acc>
void fold(int64_t C, double* n, Acc* mean, Acc* m2, double* scratch, cudaStream_t s) {
  const unsigned blocks = unsigned(std::min<int64_t>((C * C + 255) / 256, 1024));
  delta_kernel<Acc><<<unsigned((C + 255) / 256), 256, 0, s>>>(C, mean, scratch);
  fold_m2_kernel<Acc><<<blocks, 256, 0, s>>>(C, n, m2, scratch);
  fold_mean_kernel<Acc><<<1, 256, 0, s>>>(C, n, mean, scratch);
  check_launch("comoments fold");
}

template <class Acc>
__global__ void add_kernel(int64_t count, Acc* a, const Acc* b) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x)
    a[e] += b[e];
}

__global__ void merge_prepare_kernel(int64_t C, const double* nb, double* scratch) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    scratch[C] = *nb;
    scratch[C + 1] = *nb == 0 ? 1 : 0;  // nothing to merge: skip the fold
  }
}

template <class Acc>
__global__ void copy_mean_kernel(int64_t C, const Acc* mean_b, double* scratch) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x)
    scratch[c] = double(mean_b[c]);
}

}  // namespace

template <class Acc>
void comoments_update(const Batch4& y, double* n, Acc* mean, Acc* m2, double* scratch, int32_t* rejected,
                      std::uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const Runs r = collapse(y);
  const int64_t C = y.shape[1];
  const int64_t m = y.shape[0] * y.shape[2] * y.shape[3];

  cudaMemsetAsync(scratch, 0, sizeof(double) * (C + 2), s);
  const dim3 sum_block(32, 8);
  const dim3 sum_grid(unsigned((C + 7) / 8), unsigned(std::min<int64_t>((m + 1023) / 1024, 256)));
  dispatch_dtype(y.dtype, [&]<DType T>() { batch_sums_kernel<T><<<sum_grid, sum_block, 0, s>>>(y.data, r, m, scratch); return 0; });
  batch_mean_kernel<<<1, 256, 0, s>>>(C, m, scratch);

  // Enough observation slices to fill the device, but each long enough to amortise its
  // atomics into M2.
  const int64_t side = (C + kTile - 1) / kTile, tiles = side * (side + 1) / 2;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>((m + 2047) / 2048, (1024 + tiles - 1) / tiles));
  dispatch_dtype(y.dtype, [&]<DType T>() {
    comoment_tiles_kernel<T, Acc><<<dim3(unsigned(side), unsigned(side), unsigned(slices)), kThreads, 0, s>>>(y.data, r, m, scratch, m2);
    return 0;
  });
  count_rejected_kernel<<<1, 1, 0, s>>>(C, scratch, rejected);
  check_launch("comoments_update");
  fold<Acc>(C, n, mean, m2, scratch, s);
}

template <class Acc>
void comoments_merge(int64_t C, double* n_a, Acc* mean_a, Acc* m2_a, const double* n_b, const Acc* mean_b,
                     const Acc* m2_b, double* scratch, std::uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = unsigned(std::min<int64_t>((C * C + 255) / 256, 1024));
  add_kernel<Acc><<<blocks, 256, 0, s>>>(C * C, m2_a, m2_b);
  copy_mean_kernel<Acc><<<unsigned((C + 255) / 256), 256, 0, s>>>(C, mean_b, scratch);
  merge_prepare_kernel<<<1, 1, 0, s>>>(C, n_b, scratch);
  check_launch("comoments_merge");
  fold<Acc>(C, n_a, mean_a, m2_a, scratch, s);
}

template void comoments_update<double>(const Batch4&, double*, double*, double*, double*, int32_t*, std::uintptr_t);
template void comoments_update<float>(const Batch4&, double*, float*, float*, double*, int32_t*, std::uintptr_t);
template void comoments_merge<double>(int64_t, double*, double*, double*, const double*, const double*, const double*, double*, std::uintptr_t);
template void comoments_merge<float>(int64_t, double*, float*, float*, const double*, const float*, const float*, double*, std::uintptr_t);

}  // namespace afie::cuda

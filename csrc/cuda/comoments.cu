// Streaming co-moments on the device: batch mean (float64 atomics), then the centred
// co-moment Σ (y − μ_b)(y − μ_b)ᵀ over tiles of the upper triangle, read straight from
// the strided (N, C, H, W) batch (no permute copy), then the Chan fold of the batch into
// the state. Six launches per batch on the caller's stream, no host synchronisation.
//
// The co-moment of a float32 state runs on the tensor cores as 3×TF32: each centred value
// v (float32) is split into hi = tf32(v) and lo = tf32(v − hi), and hi·hi + hi·lo + lo·hi
// is accumulated in float32, which keeps float32's accuracy (the lo·lo term is below its
// rounding) at about three times the FP32 cores' rate. A float64 state keeps the exact
// CUDA-core kernel.
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

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

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

template <DType T>
__device__ __forceinline__ double load(const void* p, int64_t i) { return Load<T>::at(p, i); }

// scratch[0..C) ← per-channel batch sums. Block (32, 8): along a warp run the channels
// when they are adjacent in memory (channels_last), else the observations, so reads
// coalesce either way. Grid: (channel blocks, observation slices).
template <DType T>
__global__ void batch_sums_kernel(const void* y, Runs r, int64_t m, double* scratch) {
  const bool channel_fast = r.sC == 1;
  const int lane = threadIdx.x, row = threadIdx.y;
  const int c_in = channel_fast ? lane : row, o_in = channel_fast ? row : lane;
  const int64_t c = int64_t(blockIdx.x) * (channel_fast ? 32 : 8) + c_in;
  const int o_step_in = channel_fast ? 8 : 32;
  // Two loads in flight per thread: each is a long-latency read, and the grid is sized
  // for a handful per thread.
  double acc0 = 0, acc1 = 0;
  if (c < r.C) {
    const int64_t stride = int64_t(gridDim.y) * o_step_in;
    int64_t o = int64_t(blockIdx.y) * o_step_in + o_in;
    for (; o + stride < m; o += 2 * stride) {
      acc0 += load<T>(y, r.offset(o) + c * r.sC);
      acc1 += load<T>(y, r.offset(o + stride) + c * r.sC);
    }
    if (o < m) acc0 += load<T>(y, r.offset(o) + c * r.sC);
  }
  __shared__ double part[8][33];
  part[row][lane] = acc0 + acc1;
  __syncthreads();
  if (row != 0) return;
  // Row 0 sums what the block holds for its channels: a column (channel_fast) or a row.
  double total = 0;
  if (channel_fast) {
    for (int k = 0; k < 8; ++k) total += part[k][lane];
    if (c < r.C) atomicAdd(scratch + c, total);
  } else if (lane < 8) {
    for (int k = 0; k < 32; ++k) total += part[lane][k];
    const int64_t cc = int64_t(blockIdx.x) * 8 + lane;
    if (cc < r.C) atomicAdd(scratch + cc, total);
  }
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

namespace wmma = nvcuda::wmma;

// The float32 path, two kernels per chunk of observations. centre_kernel writes the chunk
// centred, as float32, into a dense zero-padded workspace Z [C_pad][ldz] (channel rows,
// observations contiguous): it reads the strided batch once, in whichever order
// coalesces. gram_tf32_kernel then multiplies tiles of Z on the tensor cores, loading
// them with cp.async into a two-stage shared-memory pipeline.
constexpr int kTcTile = 128, kTcDepth = 32, kTcLd = kTcDepth + 4, kTcThreads = 256;
constexpr int kTcStage = 2 * kTcTile * kTcLd;  // floats of one stage: the two operand tiles
constexpr size_t kTcSmem = 2 * kTcStage * sizeof(float);
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// Z[c][k] = y(o_begin + k, c) − μ_c, zero outside (C, count). Block 32 × 8 per 32 × 32
// tile of Z, staged through shared memory so that both the read and the write coalesce.
template <DType T>
__global__ void centre_kernel(const void* y, Runs r, int64_t o_begin, int64_t count, const double* scratch,
                              float* z, int64_t ldz) {
  __shared__ float tile[32][33];
  __shared__ int64_t offs[32];
  const int64_t k0 = int64_t(blockIdx.x) * 32, c0 = int64_t(blockIdx.y) * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (ty == 0) offs[tx] = k0 + tx < count ? r.offset(o_begin + k0 + tx) : -1;
  __syncthreads();
  const bool channel_fast = r.sC == 1;
  for (int q = ty; q < 32; q += 8) {  // tile[k][c]; the warp runs along memory
    const int k = channel_fast ? q : tx, c = channel_fast ? tx : q;
    const int64_t base = offs[k];
    tile[k][c] = base >= 0 && c0 + c < r.C ? float(load<T>(y, base + (c0 + c) * r.sC)) - float(scratch[c0 + c]) : 0.f;
  }
  __syncthreads();
  for (int q = ty; q < 32; q += 8) z[(c0 + q) * ldz + k0 + tx] = tile[tx][q];
}

__device__ __forceinline__ void cp_async16(float* dst, const float* src) {
  const unsigned d = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <class Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int t = 0; t < hi.num_elements; ++t) {
    const float v = hi.x[t];
    hi.x[t] = wmma::__float_to_tf32(v);
    lo.x[t] = wmma::__float_to_tf32(v - hi.x[t]);
  }
}

// m2 (upper triangle) += Z Zᵀ over columns [0, count_pad) of Z, 3×TF32. Block: 8 warps on
// a kTcTile² tile (4 × 2 warps of 32 × 64, each 2 × 4 fragments of 16 × 16); grid (j
// tile, i tile, slice of the columns).
template <class Acc>
__global__ void __launch_bounds__(kTcThreads) gram_tf32_kernel(const float* z, int64_t ldz, int64_t count_pad,
                                                               int64_t C, const double* scratch, Acc* m2) {
  if (blockIdx.x < blockIdx.y || scratch[C + 1] != 0) return;  // below the diagonal, or a rejected batch
  extern __shared__ __align__(128) float smem[];
  const int64_t i0 = int64_t(blockIdx.y) * kTcTile, j0 = int64_t(blockIdx.x) * kTcTile;
  const bool diagonal = i0 == j0;  // then both operands are one tile: load it once
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int64_t steps = count_pad / kTcDepth, per = (steps + gridDim.z - 1) / gridDim.z;
  const int64_t s_begin = int64_t(blockIdx.z) * per, s_end = min(steps, s_begin + per);

  // One stage: 128 rows × 32 floats per operand, 16-byte pieces, 4 (or 8) per thread.
  auto load_stage = [&](int buf, int64_t step) {
    float* a = smem + buf * kTcStage;
    const int64_t k = step * kTcDepth;
#pragma unroll
    for (int e = 0; e < kTcTile * kTcDepth / 4 / kTcThreads; ++e) {
      const int q = tid + e * kTcThreads, row = q / (kTcDepth / 4), col = (q % (kTcDepth / 4)) * 4;
      cp_async16(a + row * kTcLd + col, z + (i0 + row) * ldz + k + col);
      if (!diagonal) cp_async16(a + kTcTile * kTcLd + row * kTcLd + col, z + (j0 + row) * ldz + k + col);
    }
    cp_async_commit();
  };

  FragC acc[2][4];
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) wmma::fill_fragment(acc[u][v], 0.f);

  if (s_begin < s_end) load_stage(0, s_begin);
  for (int64_t step = s_begin; step < s_end; ++step) {
    const int buf = int((step - s_begin) & 1);
    if (step + 1 < s_end) {
      load_stage(buf ^ 1, step + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* a = smem + buf * kTcStage;
    const float* b = diagonal ? a : a + kTcTile * kTcLd;
#pragma unroll
    for (int k = 0; k < kTcDepth; k += 8) {
      FragA ah[2], al[2];
      FragB bh[4], bl[4];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        wmma::load_matrix_sync(ah[u], a + (wm * 32 + u * 16) * kTcLd + k, kTcLd);
        split_tf32(ah[u], al[u]);
      }
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        wmma::load_matrix_sync(bh[v], b + (wn * 64 + v * 16) * kTcLd + k, kTcLd);
        split_tf32(bh[v], bl[v]);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          wmma::mma_sync(acc[u][v], al[u], bh[v], acc[u][v]);
          wmma::mma_sync(acc[u][v], ah[u], bl[v], acc[u][v]);
          wmma::mma_sync(acc[u][v], ah[u], bh[v], acc[u][v]);
        }
    }
    __syncthreads();  // this buffer is refilled two steps on
  }
  // Each warp stages its fragments in shared memory in turn and adds them to M2.
  float* stage = smem + warp * 16 * 16;
  const int lane = tid % 32;
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      wmma::store_matrix_sync(stage, acc[u][v], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t i = i0 + wm * 32 + u * 16 + e / 16, j = j0 + wn * 64 + v * 16 + e % 16;
        if (i < C && j < C && j >= i) atomicAdd(m2 + i * C + j, Acc(stage[e]));
      }
      __syncwarp();
    }
}

// The Chan fold shared by update and merge: with the other side's count nb and mean μ_b
// (scratch[0..C) on entry), δ = μ_b − μ_a, M2 += δδᵀ·n_a n_b/n on the upper triangle,
// then mirror; mean and n follow. Two kernels, so every read of the old mean precedes its
// write; the second also counts a rejected batch (flag scratch[C + 1]).
template <class Acc>
__global__ void fold_m2_kernel(int64_t C, const double* n, const Acc* mean, Acc* m2, const double* scratch) {
  if (scratch[C + 1] != 0) return;
  const double na = *n, nb = scratch[C];
  const double w = na * nb / (na + nb);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < C * C; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / C, j = e % C;
    if (j < i) continue;
    const double di = scratch[i] - double(mean[i]), dj = scratch[j] - double(mean[j]);
    const Acc v = Acc(double(m2[i * C + j]) + w * di * dj);
    m2[i * C + j] = v;
    if (j > i) m2[j * C + i] = v;
  }
}

template <class Acc>
__global__ void fold_mean_kernel(int64_t C, double* n, Acc* mean, const double* scratch, int32_t* rejected) {
  if (scratch[C + 1] != 0) {
    if (threadIdx.x == 0 && rejected != nullptr) *rejected += 1;
    return;
  }
  const double na = *n, nb = scratch[C], frac = nb / (na + nb);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    mean[c] = Acc(double(mean[c]) + (scratch[c] - double(mean[c])) * frac);
  __syncthreads();
  if (threadIdx.x == 0) *n = na + nb;
}

template <class Acc>
void fold(int64_t C, double* n, Acc* mean, Acc* m2, double* scratch, int32_t* rejected, cudaStream_t s) {
  const unsigned blocks = unsigned(std::min<int64_t>((C * C + 255) / 256, 1024));
  fold_m2_kernel<Acc><<<blocks, 256, 0, s>>>(C, n, mean, m2, scratch);
  fold_mean_kernel<Acc><<<1, 256, 0, s>>>(C, n, mean, scratch, rejected);
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

// Observations per chunk: all of them, or as many as fit 2^24 floats (64 MiB) of workspace.
int64_t workspace_chunk(int64_t C, int64_t m) {
  const int64_t most = std::max<int64_t>(kTcDepth, (int64_t(1) << 24) / round_up(C, kTcTile) / kTcDepth * kTcDepth);
  return std::min(round_up(m, kTcDepth), most);
}

}  // namespace

int64_t workspace_floats(int64_t C, int64_t m) { return round_up(C, kTcTile) * workspace_chunk(C, m); }

template <class Acc>
void comoments_update(const Batch4& y, double* n, Acc* mean, Acc* m2, double* scratch, int32_t* rejected,
                      float* work, int64_t work_floats, std::uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const Runs r = collapse(y);
  const int64_t C = y.shape[1];
  const int64_t m = y.shape[0] * y.shape[2] * y.shape[3];
  if (std::is_same_v<Acc, float> && (work == nullptr || work_floats < workspace_floats(C, m)))
    throw std::invalid_argument("comoments_update: a float32 state needs workspace_floats(C, m) floats of workspace");

  cudaMemsetAsync(scratch, 0, sizeof(double) * (C + 2), s);
  const dim3 sum_block(32, 8);
  // About eight observations per thread (the sums are latency-bound, not bandwidth-bound).
  const int64_t sum_channels = r.sC == 1 ? 32 : 8, sum_obs = 8 * (256 / sum_channels);
  const dim3 sum_grid(unsigned((C + sum_channels - 1) / sum_channels), unsigned(std::min<int64_t>((m + sum_obs - 1) / sum_obs, 4096)));
  dispatch_dtype(y.dtype, [&]<DType T>() { batch_sums_kernel<T><<<sum_grid, sum_block, 0, s>>>(y.data, r, m, scratch); return 0; });
  batch_mean_kernel<<<1, 256, 0, s>>>(C, m, scratch);

  if constexpr (std::is_same_v<Acc, float>) {
    const int64_t c_pad = round_up(C, kTcTile), chunk = workspace_chunk(C, m);
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaFuncSetAttribute(gram_tf32_kernel<Acc>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kTcSmem));
    const int64_t side = c_pad / kTcTile, tiles = side * (side + 1) / 2;
    for (int64_t o = 0; o < m; o += chunk) {
      const int64_t count = std::min(chunk, m - o), count_pad = round_up(count, kTcDepth);
      dispatch_dtype(y.dtype, [&]<DType T>() {
        centre_kernel<T><<<dim3(unsigned(count_pad / 32), unsigned(c_pad / 32)), dim3(32, 8), 0, s>>>(y.data, r, o, count, scratch, work, count_pad);
        return 0;
      });
      // About two blocks per multiprocessor, each slice at least 8 steps (256 columns)
      // long, so that its atomics into M2 stay a small part of its work.
      const int64_t steps = count_pad / kTcDepth;
      const int64_t slices = std::clamp<int64_t>((2 * int64_t(sms) + tiles - 1) / tiles, 1, std::max<int64_t>(1, steps / 8));
      gram_tf32_kernel<Acc><<<dim3(unsigned(side), unsigned(side), unsigned(slices)), kTcThreads, kTcSmem, s>>>(work, count_pad, count_pad, C, scratch, m2);
    }
  } else {
    // Enough observation slices to fill the device, but each long enough to amortise its
    // atomics into M2.
    const int64_t side = (C + kTile - 1) / kTile, tiles = side * (side + 1) / 2;
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>((m + 2047) / 2048, (1024 + tiles - 1) / tiles));
    dispatch_dtype(y.dtype, [&]<DType T>() {
      comoment_tiles_kernel<T, Acc><<<dim3(unsigned(side), unsigned(side), unsigned(slices)), kThreads, 0, s>>>(y.data, r, m, scratch, m2);
      return 0;
    });
  }
  check_launch("comoments_update");
  fold<Acc>(C, n, mean, m2, scratch, rejected, s);
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
  fold<Acc>(C, n_a, mean_a, m2_a, scratch, nullptr, s);
}

template void comoments_update<double>(const Batch4&, double*, double*, double*, double*, int32_t*, float*, int64_t, std::uintptr_t);
template void comoments_update<float>(const Batch4&, double*, float*, float*, double*, int32_t*, float*, int64_t, std::uintptr_t);
template void comoments_merge<double>(int64_t, double*, double*, double*, const double*, const double*, const double*, double*, std::uintptr_t);
template void comoments_merge<float>(int64_t, double*, float*, float*, const double*, const float*, const float*, double*, std::uintptr_t);

}  // namespace afie::cuda

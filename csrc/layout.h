// How a strided (N, C, H, W) batch maps observations (n, h, w) to memory. Shared by the
// CPU and CUDA accumulators.
#pragma once
#include <cstdint>
#include <stdexcept>

#include "dtype.h"

namespace afie {

// A batch of observations laid out as (N, C, H, W) with arbitrary element strides.
// Observation = (n, h, w); variable = c.
struct Batch4 {
  const void* data;
  DType dtype;
  int64_t shape[4];    // N, C, H, W
  int64_t strides[4];  // in elements
};

// Thrown for data the caller must fix (e.g. NaN in a batch); bindings map it to ValueError.
struct BadInput : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The batch seen as N blocks of R runs of L observations, with the spatial dims, and N
// when possible, merged into longer runs: NCHW-contiguous gives runs of H·W at stride 1,
// channels_last a single run of N·H·W at stride C.
struct Runs {
  int64_t N, R, L, C;
  int64_t sN, sR, sL, sC;

  // Element offset of observation o, channel 0.
  AFIE_HD int64_t offset(int64_t o) const {
    const int64_t q = o / L, l = o % L;
    return (q / R) * sN + (q % R) * sR + l * sL;
  }
};

inline Runs collapse(const Batch4& y) {
  const int64_t N = y.shape[0], C = y.shape[1], H = y.shape[2], W = y.shape[3];
  const int64_t sN = y.strides[0], sC = y.strides[1], sH = y.strides[2], sW = y.strides[3];
  Runs r{N, H, W, C, sN, sH, sW, sC};
  if (W == 1) { r.L = H; r.R = 1; r.sL = sH; }
  if (r.R == 1 || sH == W * sW) { r.L = H * W; r.R = 1; r.sR = 0; }
  if (r.L == 1) r.sL = sN;  // 1×1 maps: the run goes across images
  if (r.R == 1 && (N == 1 || sN == r.L * r.sL)) { r.L *= N; r.N = 1; r.sN = 0; }
  return r;
}

}  // namespace afie

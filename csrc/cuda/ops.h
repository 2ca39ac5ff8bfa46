// Device versions of the core's operations. Every launch goes on the caller's stream
// (a cudaStream_t passed as an integer handle); nothing here synchronises the host.
#pragma once
#include <cstdint>

#include "../layout.h"

namespace afie::cuda {

// CUDA devices the runtime sees; 0 without a driver or device (never throws).
int device_count();

// Floats of device workspace that comoments_update needs for a batch of m observations of
// C channels with a float32 state (the centred batch, chunked to at most 64 MiB).
int64_t workspace_floats(int64_t C, int64_t m);

// Adds batch y (on the device) to the device state. Per-batch centring: the batch mean
// is taken first (in float64), then the centred co-moment is accumulated in Acc
// (float32 or float64) tile by tile. A batch with NaN/Inf is skipped on the device and
// counted in *rejected, so the host learns of it without a per-batch sync.
template <class Acc>
void comoments_update(const Batch4& y,
                      double* n,        // [1]
                      Acc* mean,        // [C]
                      Acc* m2,          // [C, C]
                      double* scratch,  // [C + 2] workspace
                      int32_t* rejected,  // [1] count of skipped batches
                      float* work, int64_t work_floats,  // workspace_floats(C, m) (float32 states)
                      std::uintptr_t stream);

// a ← a ⊕ b for device states (Chan et al.).
template <class Acc>
void comoments_merge(int64_t C, double* n_a, Acc* mean_a, Acc* m2_a, const double* n_b, const Acc* mean_b,
                     const Acc* m2_b, double* scratch /* [C + 2] */, std::uintptr_t stream);

}  // namespace afie::cuda

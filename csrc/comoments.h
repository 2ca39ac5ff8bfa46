// Streaming first and second co-moments of C variables (Chan, Golub & LeVeque's parallel
// update): state n, mean μ [C] and M2 = Σ (y − μ)(y − μ)ᵀ [C, C]. The state is always a
// full symmetric M2; it is never formed as Σ yyᵀ − nμμᵀ.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "layout.h"

namespace afie {

// Adds one batch to the state. Acc is the state's float type (double by default).
// Rejects a batch with any non-finite value (BadInput) before touching the state. The
// batch holds at least one observation (the bindings refuse empty ones).
// float_products: multiply in float32 for inputs of float32 or narrower (per-chunk
// centring keeps the error near the inputs' own rounding; chunks still add up in Acc).
// threads: the core's own workers (parallel.h; BLAS itself runs single-threaded inside each).
template <class Acc>
void comoments_update_cpu(const Batch4& y,
                          double* n,    // [1]
                          Acc* mean,    // [C]
                          Acc* m2,      // [C, C] row-major, full symmetric
                          int threads, bool float_products);

// a ← a ⊕ b (both states of width C).
template <class Acc>
void comoments_merge_cpu(int64_t C,
                         double* n_a, Acc* mean_a, Acc* m2_a,                     // in/out
                         const double* n_b, const Acc* mean_b, const Acc* m2_b);  // in

}  // namespace afie

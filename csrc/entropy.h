// AFIE's entropy of a spectrum (DESIGN §2): min-max → softmax → natural-log entropy.
#pragma once
#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace afie {

// K = −Σ q_i ln q_i with q = softmax(t), t = min-max normalised s. A flat (or all-zero)
// spectrum gives t = 0 and K = ln p, never NaN.
AFIE_HD double spectrum_entropy(const double* s,  // [p]
                                int64_t p) {
  double lo = s[0], hi = s[0];
  for (int64_t i = 1; i < p; ++i) {
    lo = s[i] < lo ? s[i] : lo;
    hi = s[i] > hi ? s[i] : hi;
  }
  const double range = hi - lo;
  const double scale = fabs(hi) > 1e-30 ? fabs(hi) : 1e-30;
  const bool flat = !(range > 1e-12 * scale);
  // t ∈ [0, 1], so exp(t) cannot overflow: no max-subtraction needed.
  // With Z = Σ e^{t_j}: K = ln Z − Σ t_i e^{t_i} / Z.
  double z = 0.0, zt = 0.0;
  for (int64_t i = 0; i < p; ++i) {
    const double t = flat ? 0.0 : (s[i] - lo) / range;
    const double e = exp(t);
    z += e;
    zt += t * e;
  }
  return log(z) - zt / z;
}

}  // namespace afie

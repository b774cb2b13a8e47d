// GAE over packed sequences on the CPU: the reverse loop of reference.gae_ref, accumulated in double with the same
// operation order, so fp32/fp64 results are bit-identical to the reference (tests compare them exactly).
// The wrapper (ovr_kernels/gae.py) validates dtypes, sizes and cu_seqlens and passes fp16/bf16 inputs as fp64.
#include <cstdint>

#include "checks.h"

// The reference's Python arithmetic rounds every multiply and add: keep GCC from contracting them into FMAs.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace ovr {

template <typename T>
static void gae_loop(const T* rewards, const T* values, const int32_t* cu, int64_t num_seqs, T* adv, T* ret,
                     double gamma, double lam) {
  const double gamma_lam = gamma * lam;  // the reference evaluates gamma * lam * A left to right
  for (int64_t b = 0; b < num_seqs; ++b) {
    double next_v = 0.0, next_a = 0.0;  // V and A past the sequence's end are 0
    for (int64_t t = static_cast<int64_t>(cu[b + 1]) - 1; t >= cu[b]; --t) {
      const double v = static_cast<double>(values[t]);
      const double delta = static_cast<double>(rewards[t]) + gamma * next_v - v;
      next_a = delta + gamma_lam * next_a;
      adv[t] = static_cast<T>(next_a);
      ret[t] = static_cast<T>(next_a + v);
      next_v = v;
    }
  }
}

// rewards/values/adv/ret (T,) of `dtype` (kFloat32 or kFloat64), cu (num_seqs+1,) int32.
void gae_cpu(uintptr_t rewards, uintptr_t values, uintptr_t cu, int64_t num_seqs, uintptr_t adv, uintptr_t ret,
             double gamma, double lam, int dtype) {
  const auto* cu_p = reinterpret_cast<const int32_t*>(cu);
  if (dtype == kFloat32) {
    gae_loop(reinterpret_cast<const float*>(rewards), reinterpret_cast<const float*>(values), cu_p, num_seqs,
             reinterpret_cast<float*>(adv), reinterpret_cast<float*>(ret), gamma, lam);
  } else if (dtype == kFloat64) {
    gae_loop(reinterpret_cast<const double*>(rewards), reinterpret_cast<const double*>(values), cu_p, num_seqs,
             reinterpret_cast<double*>(adv), reinterpret_cast<double*>(ret), gamma, lam);
  } else {
    OVR_CHECK(false, "gae_cpu: dtype code must be 0 (float32) or 1 (float64), got " << dtype);
  }
}

}  // namespace ovr
